"""The registry runs torch on one thread: uploads are validated where forwards run.

A second thread calling torch brings a second OpenMP team; with more OpenMP threads than
cores libgomp sleeps at barriers and every later forward gets slower.
"""

import asyncio
import threading

import torch

from fedssl_core import names, weights
from fedssl_core.models import TASK_GROUPS, FedSSLModel, select_groups
from fedssl_registry import db
from fedssl_registry.inference.repository import torch_thread
from fedssl_registry.schemas import InputSpec, ModelCreate, VersionMetadata
from fedssl_registry.service import Registry
from fedssl_registry.storage import ArtifactStore


class RecordingRegistry(Registry):
    """The real registry, noting which thread validates each upload."""

    validated_on: list[str]

    def _validate_weights(self, m, path):
        self.validated_on.append(threading.current_thread().name)
        super()._validate_weights(m, path)


def test_uploads_are_validated_on_the_torch_thread(tmp_path):
    executor = torch_thread(1)
    try:
        registry = RecordingRegistry(db.make_sessionmaker(db.make_engine(f"sqlite:///{tmp_path / 'r.db'}")),
                                     ArtifactStore(tmp_path / "artifacts"), executor)
        registry.validated_on = []
        registry.create_model(ModelCreate(name="clf", task="classification",
                                          input_spec=InputSpec(image_size=32, class_names=["a", "b"])))
        state = select_groups(FedSSLModel(names.ARCH_RESNET18, num_classes=2).state_dict(), TASK_GROUPS[names.TASK_CLASSIFICATION])
        async def body():
            yield weights.to_bytes(state, {})

        upload = asyncio.run(registry.store.receive(body(), 1 << 30))
        version = registry.create_version("clf", upload, VersionMetadata())
        assert version["version"] == 1
        assert len(registry.validated_on) == 1 and registry.validated_on[0].startswith("fedssl-torch")
        # The torch thread got the requested intra-op threads.
        assert executor.submit(torch.get_num_threads).result() == 1
    finally:
        executor.shutdown()
