import json

import pytest
import torch

from fedssl_core import label_shift, names, weights
from fedssl_core.models import TASK_GROUPS, FedSSLModel, select_groups
from tests.support import processes as P

CLASSES = ["akiec", "bcc", "bkl"]
IMAGE_SIZE = 32


def classifier_bytes(seed: int = 0, num_classes: int = len(CLASSES), **metadata: str) -> bytes:
    torch.manual_seed(seed)
    state = select_groups(FedSSLModel(num_classes=num_classes).state_dict(), TASK_GROUPS[names.TASK_CLASSIFICATION])
    return weights.to_bytes(state, {"fedssl.task": "classification", **metadata})


# what an aggregator records on a classifier trained with balanced softmax (fedssl_core.label_shift)
HOSPITAL_COUNTS = {"dermaclinic": [30, 5, 5], "skinlab": [2, 20, 10]}


def hospital_statistics(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Each of HOSPITAL_COUNTS' hospitals' BatchNorm statistics for `classifier_bytes`' model,
    as hospital-batchnorm sends them (fedssl_core.hospital_batchnorm): the model's own,
    shifted and scaled differently per hospital."""
    from fedssl_core import hospital_batchnorm

    own = hospital_batchnorm.statistics_of(FedSSLModel(num_classes=len(CLASSES)).encoder)
    own = {f"encoder.{k}": v for k, v in own.items()}
    g = torch.Generator().manual_seed(seed)
    return {h: {k: (v + torch.randn(v.shape, generator=g) * 0.5 if k.endswith("running_mean")
                    else v * torch.empty(v.shape).uniform_(0.3, 3.0, generator=g)) for k, v in own.items()}
            for h in HOSPITAL_COUNTS}  # statistics_of: the encoder's layers (the served classifier has no others)


def classifier_with_statistics_bytes(stats: dict[str, dict[str, torch.Tensor]] | None = None, **metadata: str) -> bytes:
    """`classifier_bytes()`'s weights carrying HOSPITAL_COUNTS and every hospital's BatchNorm
    statistics (`stats`, default `hospital_statistics()`), as the aggregator registers them."""
    from fedssl_core import hospital_batchnorm

    blob = classifier_bytes()
    tensors, meta = hospital_batchnorm.pack(hospital_statistics() if stats is None else stats)
    return weights.to_bytes({**weights.from_bytes(blob), **tensors},
                            {**weights.read_metadata(blob), label_shift.META_KEY: label_shift.encode(HOSPITAL_COUNTS), **meta, **metadata})


def model_body(name="clf", task="classification", **spec):
    return {"name": name, "task": task, "architecture": "resnet18", "description": "test model",
            "input_spec": {"image_size": IMAGE_SIZE, "class_names": CLASSES if task == "classification" else [], **spec}}


def upload(http, name, blob, metadata=None):
    data = {"metadata": json.dumps(metadata)} if metadata is not None else {}
    return http.post(f"/v1/models/{name}/versions", files={"file": ("w.safetensors", blob, "application/octet-stream")}, data=data)


@pytest.fixture(scope="module")
def weights_blob():
    return classifier_bytes()


@pytest.fixture
def cluster(tmp_path):
    with P.cluster(tmp_path) as c:
        yield c


@pytest.fixture
def registry(cluster, tmp_path):
    return P.start_registry(cluster, tmp_path / "data")


@pytest.fixture(scope="module")
def shared_registry(tmp_path_factory, weights_blob):
    """One registry with model `clf` (version 1 = production) for read-only tests."""
    work = tmp_path_factory.mktemp("shared-registry")
    with P.cluster(work) as c:
        reg = P.start_registry(c, work / "data", max_batch_wait_ms="2")
        with reg.client() as http:
            assert http.post("/v1/models", json=model_body()).status_code == 201
            assert upload(http, "clf", weights_blob, {"lineage": {"run_id": "r1", "round": 1}}).status_code == 201
            assert http.put("/v1/models/clf/aliases/production", json={"version": 1}).status_code == 200
            # the same weights served with test-time augmentation (the 8 flips and 90-degree turns)
            assert http.post("/v1/models", json=model_body("clf-tta", test_time_augmentation="dihedral")).status_code == 201
            assert upload(http, "clf-tta", weights_blob).status_code == 201
            # the same weights carrying two hospitals' training label counts
            assert http.post("/v1/models", json=model_body("clf-sites")).status_code == 201
            assert upload(http, "clf-sites", classifier_bytes(**{label_shift.META_KEY: label_shift.encode(HOSPITAL_COUNTS)})
                          ).status_code == 201
            # ... and each hospital's own BatchNorm statistics (hospital-batchnorm)
            assert http.post("/v1/models", json=model_body("clf-site-bn")).status_code == 201
            assert upload(http, "clf-site-bn", classifier_with_statistics_bytes()).status_code == 201
        yield reg
