"""KServe Open Inference Protocol v2 (REST): request decoding, validation, response encoding.

Embedding and classification models: inputs, exactly one per request, shape [N, 3, S, S]
with S the model's image size:
  `input`  FP32, already normalised with the model's mean/std;
  `image`  UINT8, RGB pixels as `fedssl_core.preprocessing.load_image` gives them (normalised
           here with `normalize` and the model's mean/std, exactly as `:predict` and training do).
Outputs: classification → `probabilities` FP32 [N, K] and `label` BYTES [N];
embedding → `embedding` FP32 [N, D]. A classification request's `parameters.hospital` names
the asking hospital: the probabilities are then adjusted to its own label mix
(`fedssl_core.label_shift`) and the response's `parameters.hospital` says so.
Generation models (`parse_generate_request`): inputs `class` INT64 [N] (class indices), and
`seed` INT64 [1] (default 0) or `latent` FP32 [N, z_dim], not both; output `images` UINT8
[N, S, S, 3] (RGB, channels last as in an image file): `fedssl_core.generative.sample`, the
images `:generate` encodes as PNGs.
At most `max_batch` images (N) per request, published as `parameters.max_batch_size` in the
model metadata; a larger request is a 413.
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

from ..core.errors import InvalidInput, PayloadTooLarge, WrongTask

HEADER_LENGTH = "Inference-Header-Content-Length"
DTYPES = {"FP32": np.float32, "UINT8": np.uint8, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32, "FP64": np.float64}
INPUTS = {"input": "FP32", "image": "UINT8"}
GENERATE_INPUTS = {"class": "INT64", "latent": "FP32", "seed": "INT64"}  # a generator's; class is required
# A request this small is parsed on the event loop, where it costs at most a few ms (on one
# core: one 224 x 224 UINT8 image in binary 0.9 ms, 64 KiB of JSON ~5 ms); a larger one goes
# to the decode pool (eight UINT8 images took 28 ms in binary and 330 ms as JSON, 64 took
# 0.3 s in binary), a thread hop being cheaper than stalling every other request.
INLINE_JSON_BYTES = 64 * 1024
INLINE_BINARY_BYTES = 256 * 1024


def model_metadata(model: dict, versions: list[int], max_batch: int) -> dict:
    if model["task"] == names.TASK_GENERATION:
        return generator_metadata(model, versions, max_batch)
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


def generator_metadata(model: dict, versions: list[int], max_batch: int) -> dict:
    spec = model["input_spec"]
    s, z = int(spec["image_size"]), int(spec["z_dim"])
    return {
        "name": model["name"],
        "versions": [str(v) for v in versions],
        "platform": "fedssl-pytorch",
        "inputs": [{"name": "class", "datatype": "INT64", "shape": [-1]},
                   {"name": "latent", "datatype": "FP32", "shape": [-1, z]},
                   {"name": "seed", "datatype": "INT64", "shape": [1]}],
        "outputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, s, s, 3]}],
        # v2 tensor metadata has no word for "optional": say it here, with what the indices mean
        "parameters": {"task": model["task"], "architecture": model["architecture"], "class_names": spec.get("class_names", []),
                       "image_size": s, "z_dim": z, "max_batch_size": max_batch, "required_inputs": ["class"],
                       "optional_inputs": ["latent", "seed"], "default_seed": 0},
    }


@dataclass
class InferRequest:
    id: str | None
    array: np.ndarray  # normalised float32 (N, 3, S, S)
    outputs: list[dict] | None
    binary_output: bool
    hospital: str | None = None  # parameters.hospital: serve that hospital its own label mix


@dataclass
class GenerateInferRequest:
    id: str | None
    labels: np.ndarray  # int64 (N,) class indices, each in 0..K-1
    seed: int
    latent: np.ndarray | None  # float32 (N, z_dim), or None: drawn from `seed`
    outputs: list[dict] | None
    binary_output: bool


def parses_inline(body_size: int, header_length: str | None) -> bool:
    """Whether a request body of `body_size` bytes is cheap enough to parse on the event loop."""
    try:
        json_size = body_size if header_length is None else int(header_length)
    except ValueError:
        return True  # parse_request refuses it at once
    return json_size <= INLINE_JSON_BYTES and body_size - json_size <= INLINE_BINARY_BYTES


def _read_head(body: bytes, header_length: str | None) -> tuple[dict, bytes | memoryview]:
    """(the request's JSON object, the tensor bytes after it): a v2 request body, with the
    binary extension's header length if it has one. Checks what every request shares: an
    object with a non-empty `inputs` list and a string `id`, if any."""
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
    return req, binary


def _outputs(req: dict) -> tuple[list[dict] | None, bool]:
    """The request's `outputs` (a list of objects with names, or None) and whether it asks
    for binary outputs by default."""
    outputs = req.get("outputs")
    if outputs is not None and not (isinstance(outputs, list)
                                    and all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs)):
        raise InvalidInput("'outputs' must be a list of objects, each with a name")
    binary_output = bool(_parameters(req, "the request").get("binary_data_output")) or any(
        _parameters(o, f"output {o.get('name')!r}").get("binary_data") for o in outputs or [])
    return outputs, binary_output


def parse_request(body: bytes, header_length: str | None, image_size: int, mean, std, max_batch: int) -> InferRequest:
    req, binary = _read_head(body, header_length)
    if len(req["inputs"]) != 1:
        raise InvalidInput(f"expected exactly one input ('input' FP32 or 'image' UINT8), got {len(req['inputs'])}")
    inp = req["inputs"][0]
    if not isinstance(inp, dict):
        raise InvalidInput("each input must be an object with name, shape, datatype and data")
    name, dtype, shape = inp.get("name"), inp.get("datatype"), inp.get("shape")
    if not isinstance(name, str):
        raise InvalidInput(f"input 'name' must be a string, 'input' or 'image'; got {type(name).__name__}")
    if name not in INPUTS:
        also = " ('class', 'latent' and 'seed' are a generation model's inputs)" if name in GENERATE_INPUTS else ""
        raise InvalidInput(f"unknown input {name!r}; expected 'input' (FP32, normalised) or 'image' (UINT8 pixels){also}")
    if dtype != INPUTS[name]:
        raise InvalidInput(f"input {name!r} must have datatype {INPUTS[name]}, got {dtype!r}")
    expected = [3, image_size, image_size]
    if not (isinstance(shape, list) and len(shape) == 4 and all(type(d) is int for d in shape)
            and shape[0] >= 1 and shape[1:] == expected):
        raise InvalidInput(f"input {name!r} has shape {shape}; expected [N, {', '.join(map(str, expected))}]")
    if shape[0] > max_batch:  # before its data becomes an array
        raise PayloadTooLarge(f"input {name!r} has {shape[0]} images; at most {max_batch} per request "
                              "(parameters.max_batch_size in the model's metadata): send them in several requests")
    x, used = _tensor(inp, name, dtype, shape, binary, 0)
    if used != len(binary):  # the one input takes every byte after the header, or none with its values in 'data'
        raise InvalidInput(f"input {name!r} takes {used} bytes after the JSON header (its binary_data_size), but "
                           f"{len(binary)} follow it" if used else
                           f"input {name!r} has its values in 'data', but {len(binary)} bytes follow the JSON header: "
                           "send them as its binary data (parameters.binary_data_size) or leave them out")
    # numpy only: this runs on the event loop, and torch work belongs to the torch thread.
    if dtype == "UINT8":
        x = normalize(x, mean, std)  # numpy in, numpy out: the same values as the hospitals' torch call
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InvalidInput(f"input {name!r} contains NaN or infinite values")
    outputs, binary_output = _outputs(req)
    hospital = _parameters(req, "the request").get("hospital")
    if hospital is not None and not isinstance(hospital, str):
        raise InvalidInput(f"parameters.hospital must be a string, the asking hospital's name; got {type(hospital).__name__}")
    return InferRequest(req.get("id"), x, outputs, binary_output, hospital)


def parse_generate_request(body: bytes, header_length: str | None, model: str, class_names: list[str], z_dim: int,
                           max_batch: int) -> GenerateInferRequest:
    """A generation model's v2 request: `class` INT64 [N], with `seed` INT64 [1] or `latent`
    FP32 [N, z_dim] (not both; neither: seed 0). Binary inputs follow the JSON header in the
    order of `inputs`. Numpy only: it may run on the event loop."""
    req, binary = _read_head(body, header_length)
    expected = f"'class' (INT64 [N], class indices), and 'seed' (INT64 [1]) or 'latent' (FP32 [N, {z_dim}])"
    if len(req["inputs"]) > len(GENERATE_INPUTS):
        raise InvalidInput(f"expected at most {len(GENERATE_INPUTS)} inputs, {expected}; got {len(req['inputs'])}")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for inp in req["inputs"]:
        if not isinstance(inp, dict):
            raise InvalidInput("each input must be an object with name, shape, datatype and data")
        name, dtype, shape = inp.get("name"), inp.get("datatype"), inp.get("shape")
        if not isinstance(name, str):
            raise InvalidInput(f"input 'name' must be a string, one of 'class', 'latent' or 'seed'; got {type(name).__name__}")
        if name in INPUTS:
            raise WrongTask(f"model {model!r} is a generation model: it takes no images (input {name!r} is for embedding and "
                            f"classification models); its inputs are {expected}")
        if name not in GENERATE_INPUTS:
            raise InvalidInput(f"unknown input {name!r}; a generation model takes {expected}")
        if name in arrays:
            raise InvalidInput(f"input {name!r} appears more than once")
        if dtype != GENERATE_INPUTS[name]:
            raise InvalidInput(f"input {name!r} must have datatype {GENERATE_INPUTS[name]}, got {dtype!r}")
        want = {"class": "[N]", "seed": "[1]", "latent": f"[N, {z_dim}]"}[name]
        if not (isinstance(shape, list) and all(type(d) is int for d in shape) and shape and shape[0] >= 1
                and {"class": len(shape) == 1, "seed": shape == [1], "latent": len(shape) == 2 and shape[1:] == [z_dim]}[name]):
            raise InvalidInput(f"input {name!r} has shape {shape}; expected {want}")
        if shape[0] > max_batch:  # before its data becomes an array
            raise PayloadTooLarge(f"input {name!r} asks for {shape[0]} images; at most {max_batch} per request "
                                  "(parameters.max_batch_size in the model's metadata): send them in several requests")
        arrays[name], used = _tensor(inp, name, dtype, shape, binary, offset)
        offset += used
    if offset != len(binary):
        raise InvalidInput(f"the inputs' binary_data_size add up to {offset} bytes, but {len(binary)} follow the JSON header")
    if "class" not in arrays:
        raise InvalidInput(f"input 'class' is missing: a generation model takes {expected}")
    if "seed" in arrays and "latent" in arrays:
        raise InvalidInput("give input 'seed' (latents drawn from it) or 'latent' (the latents themselves), not both")
    labels = arrays["class"].astype(np.int64, copy=False)
    bad = labels[(labels < 0) | (labels >= len(class_names))]
    if bad.size:
        known = ", ".join(f"{i}: {c!r}" for i, c in enumerate(class_names))
        raise InvalidInput(f"input 'class' has index {int(bad[0])}; model {model!r} draws classes 0..{len(class_names) - 1} ({known})")
    latent = arrays.get("latent")
    if latent is not None:
        if latent.shape[0] != labels.shape[0]:
            raise InvalidInput(f"input 'latent' has {latent.shape[0]} rows and input 'class' {labels.shape[0]}: "
                               "one latent row per image")
        if not np.isfinite(latent).all():
            raise InvalidInput("input 'latent' contains NaN or infinite values")
        latent = np.ascontiguousarray(latent, dtype=np.float32)
    seed = int(arrays["seed"][0]) if "seed" in arrays else 0
    if seed < 0:
        raise InvalidInput(f"input 'seed' is {seed}; expected an integer >= 0")
    outputs, binary_output = _outputs(req)
    return GenerateInferRequest(req.get("id"), labels, seed, latent, outputs, binary_output)


def _tensor(inp: dict, name: str, dtype: str, shape: list[int], binary: bytes | memoryview, offset: int) -> tuple[np.ndarray, int]:
    """(input `inp`'s values as an array of `shape`, the binary bytes it took after `offset`)."""
    count = math.prod(shape)
    params = _parameters(inp, f"input {name!r}")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if type(size) is not int:
            raise InvalidInput(f"binary_data_size of input {name!r} must be an integer, got {size!r}")
        itemsize = np.dtype(DTYPES[dtype]).itemsize
        if size != count * itemsize:
            raise InvalidInput(f"input {name!r} has {size} bytes; shape {shape} of {dtype} needs {count * itemsize}")
        if offset + size > len(binary):
            raise InvalidInput(f"input {name!r} needs {size} bytes after the JSON header's first {offset}, "
                               f"but only {len(binary) - offset} are left")
        return np.frombuffer(binary, dtype=DTYPES[dtype], count=count, offset=offset).reshape(shape), size
    if "data" not in inp:
        raise InvalidInput(f"input {name!r} has no 'data'")
    try:
        if dtype == "INT64":
            raw = np.asarray(inp["data"])
            if raw.size and raw.dtype.kind not in "iub":
                raise ValueError(f"found {raw.dtype.name} values")  # 1.5 would silently become 1
        # numpy converts to the datatype itself, refusing out-of-range values (300 as UINT8)
        arr = np.asarray(inp["data"], dtype=DTYPES[dtype])
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"input {name!r} data is not a list of {dtype} numbers: {exc}") from None
    except RecursionError:
        raise InvalidInput(f"input {name!r} data nests too deeply to be a list of {dtype} numbers") from None
    if arr.size != count:
        raise InvalidInput(f"input {name!r} has {arr.size} values; shape {shape} needs {count}")
    return arr.reshape(shape), 0


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
                   req: InferRequest | GenerateInferRequest) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of the v2 response; binary when the request asked for it. `out` is a
    generator's uint8 images (N, S, S, 3), else the model's float outputs."""
    tensors: list[tuple[str, str, list[int], Any]] = []
    if task == names.TASK_GENERATION:
        images = np.ascontiguousarray(out, dtype=np.uint8)
        tensors.append(("images", "UINT8", list(images.shape), images))
    elif task == names.TASK_CLASSIFICATION:
        arr = np.asarray(out, dtype=np.float32)
        tensors.append(("probabilities", "FP32", list(arr.shape), arr))
        labels = [class_names[i] if i < len(class_names) else str(i) for i in arr.argmax(axis=1)]
        tensors.append(("label", "BYTES", [len(labels)], labels))
    else:
        arr = np.asarray(out, dtype=np.float32)
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
    if getattr(req, "hospital", None) is not None:
        head["parameters"] = {"hospital": req.hospital}
    header = json.dumps(head, allow_nan=False).encode()  # strict JSON: the caller checked `out` is finite
    if blobs:
        return header + b"".join(blobs), {HEADER_LENGTH: str(len(header)), "content-type": "application/octet-stream"}
    return header, {"content-type": "application/json"}
