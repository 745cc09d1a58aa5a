"""KServe Open Inference Protocol v2 (REST): request decoding, validation, response encoding.

Inputs, exactly one per request, shape [N, 3, S, S] with S the model's image size:
  `input`  FP32, already normalised with the model's mean/std;
  `image`  UINT8, RGB pixels as `fedssl_core.preprocessing.load_image` gives them (normalised
           here with `normalize` and the model's mean/std, exactly as `:predict` and training do).
At most `max_batch` images (N) per request, published as `parameters.max_batch_size` in the
model metadata; a larger request is a 413.
Outputs: classification → `probabilities` FP32 [N, K] and `label` BYTES [N];
embedding → `embedding` FP32 [N, D].
Both JSON tensors and the binary tensor data extension (Inference-Header-Content-Length)
are supported, for requests and responses, as tritonclient and other v2 clients use them.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedssl_core import names
from fedssl_core.preprocessing import normalize

from ..core.errors import InvalidInput, PayloadTooLarge

HEADER_LENGTH = "Inference-Header-Content-Length"
DTYPES = {"FP32": np.float32, "UINT8": np.uint8, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32, "FP64": np.float64}
INPUTS = {"input": "FP32", "image": "UINT8"}
# A request this small is parsed on the event loop, where it costs at most a few ms (on one
# core: one 224 x 224 UINT8 image in binary 0.9 ms, 64 KiB of JSON ~5 ms); a larger one goes
# to the decode pool (eight UINT8 images took 28 ms in binary and 330 ms as JSON, 64 took
# 0.3 s in binary), a thread hop being cheaper than stalling every other request.
INLINE_JSON_BYTES = 64 * 1024
INLINE_BINARY_BYTES = 256 * 1024


def model_metadata(model: dict, versions: list[int], max_batch: int) -> dict:
    s = int(model["input_spec"]["image_size"])
    shape = [-1, 3, s, s]
    if model["task"] == names.TASK_CLASSIFICATION:
        k = len(model["input_spec"].get("class_names", []))
        outputs = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, k]}, {"name": "label", "datatype": "BYTES", "shape": [-1]}]
    else:
        outputs = [{"name": "embedding", "datatype": "FP32", "shape": [-1, -1]}]
    return {
        "name": model["name"],
        "versions": [str(v) for v in versions],
        "platform": "fedssl-pytorch",
        "inputs": [{"name": n, "datatype": d, "shape": shape} for n, d in INPUTS.items()],
        "outputs": outputs,
        "parameters": {"task": model["task"], "architecture": model["architecture"],
                       "class_names": model["input_spec"].get("class_names", []),
                       "mean": model["input_spec"].get("mean"), "std": model["input_spec"].get("std"),
                       "max_batch_size": max_batch}
        | ({"test_time_augmentation": model["input_spec"].get("test_time_augmentation") or names.TTA_NONE}
           if model["task"] == names.TASK_CLASSIFICATION else {}),
    }


@dataclass
class InferRequest:
    id: str | None
    array: np.ndarray  # normalised float32 (N, 3, S, S)
    outputs: list[dict] | None
    binary_output: bool


def parses_inline(body_size: int, header_length: str | None) -> bool:
    """Whether a request body of `body_size` bytes is cheap enough to parse on the event loop."""
    try:
        json_size = body_size if header_length is None else int(header_length)
    except ValueError:
        return True  # parse_request refuses it at once
    return json_size <= INLINE_JSON_BYTES and body_size - json_size <= INLINE_BINARY_BYTES


def parse_request(body: bytes, header_length: str | None, image_size: int, mean, std, max_batch: int) -> InferRequest:
    binary: bytes | memoryview = b""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 <= n <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH}={n} exceeds the body ({len(body)} bytes)")
        body, binary = body[:n], memoryview(body)[n:]  # the tensor bytes are not copied
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidInput("request body nests JSON arrays or objects too deeply to parse") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise InvalidInput("request must be a JSON object with a non-empty 'inputs' list")
    if "id" in req and not isinstance(req["id"], str):
        raise InvalidInput(f"'id' must be a string, got {type(req['id']).__name__}")
    if len(req["inputs"]) != 1:
        raise InvalidInput(f"expected exactly one input ('input' FP32 or 'image' UINT8), got {len(req['inputs'])}")
    inp = req["inputs"][0]
    if not isinstance(inp, dict):
        raise InvalidInput("each input must be an object with name, shape, datatype and data")
    name, dtype, shape = inp.get("name"), inp.get("datatype"), inp.get("shape")
    if not isinstance(name, str):
        raise InvalidInput(f"input 'name' must be a string, 'input' or 'image'; got {type(name).__name__}")
    if name not in INPUTS:
        raise InvalidInput(f"unknown input {name!r}; expected 'input' (FP32, normalised) or 'image' (UINT8 pixels)")
    if dtype != INPUTS[name]:
        raise InvalidInput(f"input {name!r} must have datatype {INPUTS[name]}, got {dtype!r}")
    expected = [3, image_size, image_size]
    if not (isinstance(shape, list) and len(shape) == 4 and all(type(d) is int for d in shape)
            and shape[0] >= 1 and shape[1:] == expected):
        raise InvalidInput(f"input {name!r} has shape {shape}; expected [N, {', '.join(map(str, expected))}]")
    if shape[0] > max_batch:  # before its data becomes an array
        raise PayloadTooLarge(f"input {name!r} has {shape[0]} images; at most {max_batch} per request "
                              "(parameters.max_batch_size in the model's metadata): send them in several requests")
    count = math.prod(shape)
    params = _parameters(inp, f"input {name!r}")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if type(size) is not int:
            raise InvalidInput(f"binary_data_size of input {name!r} must be an integer, got {size!r}")
        if size != len(binary):
            raise InvalidInput(f"binary_data_size {size} does not match the {len(binary)} bytes after the JSON header")
        itemsize = np.dtype(DTYPES[dtype]).itemsize
        if size != count * itemsize:
            raise InvalidInput(f"input {name!r} has {size} bytes; shape {shape} of {dtype} needs {count * itemsize}")
        arr = np.frombuffer(binary, dtype=DTYPES[dtype])
    else:
        if "data" not in inp:
            raise InvalidInput(f"input {name!r} has no 'data'")
        try:
            arr = np.asarray(inp["data"], dtype=DTYPES[dtype])
        except (ValueError, TypeError, OverflowError) as exc:
            raise InvalidInput(f"input {name!r} data is not a list of {dtype} numbers: {exc}") from None
    if arr.size != count:
        raise InvalidInput(f"input {name!r} has {arr.size} values; shape {shape} needs {count}")
    # numpy only: this runs on the event loop, and torch work belongs to the torch thread.
    x = arr.reshape(shape)
    if dtype == "UINT8":
        x = normalize(x, mean, std)  # numpy in, numpy out: the same values as the hospitals' torch call
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InvalidInput(f"input {name!r} contains NaN or infinite values")
    outputs = req.get("outputs")
    if outputs is not None and not (isinstance(outputs, list)
                                    and all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs)):
        raise InvalidInput("'outputs' must be a list of objects, each with a name")
    binary_output = bool(_parameters(req, "the request").get("binary_data_output")) or any(
        _parameters(o, f"output {o.get('name')!r}").get("binary_data") for o in outputs or [])
    return InferRequest(req.get("id"), x, outputs, binary_output)


def _parameters(obj: dict, what: str) -> dict:
    """`obj`'s optional v2 `parameters` object."""
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidInput(f"'parameters' of {what} must be an object, got {type(params).__name__}")
    return params


def _bytes_tensor(values: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)


def build_response(model_name: str, version: int, task: str, class_names: list[str], out: np.ndarray,
                   req: InferRequest) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of the v2 response; binary when the request asked for it."""
    arr = np.asarray(out, dtype=np.float32)
    tensors: list[tuple[str, str, list[int], Any]] = []
    if task == names.TASK_CLASSIFICATION:
        tensors.append(("probabilities", "FP32", list(arr.shape), arr))
        labels = [class_names[i] if i < len(class_names) else str(i) for i in arr.argmax(axis=1)]
        tensors.append(("label", "BYTES", [len(labels)], labels))
    else:
        tensors.append(("embedding", "FP32", list(arr.shape), arr))
    wanted = None
    per_output_binary: dict[str, bool] = {}
    if req.outputs:
        wanted = set()
        for o in req.outputs:  # a list of objects with names (parse_request checked)
            wanted.add(o["name"])
            per_output_binary[o["name"]] = bool(_parameters(o, f"output {o['name']!r}").get("binary_data", req.binary_output))
        unknown = wanted - {t[0] for t in tensors}
        if unknown:
            raise InvalidInput(f"unknown output(s) {', '.join(sorted(unknown))}; this model has {', '.join(t[0] for t in tensors)}")
    outputs, blobs = [], []
    for name, dtype, shape, value in tensors:
        if wanted is not None and name not in wanted:
            continue
        entry: dict[str, Any] = {"name": name, "datatype": dtype, "shape": shape}
        if per_output_binary.get(name, req.binary_output):
            blob = _bytes_tensor(value) if dtype == "BYTES" else np.ascontiguousarray(value).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = value if dtype == "BYTES" else value.reshape(-1).tolist()
        outputs.append(entry)
    head = {"model_name": model_name, "model_version": str(version), "outputs": outputs}
    if req.id is not None:
        head["id"] = req.id
    header = json.dumps(head, allow_nan=False).encode()  # strict JSON: the caller checked `out` is finite
    if blobs:
        return header + b"".join(blobs), {HEADER_LENGTH: str(len(header)), "content-type": "application/octet-stream"}
    return header, {"content-type": "application/json"}
