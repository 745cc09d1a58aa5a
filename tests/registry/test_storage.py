"""The artifact store on a real directory: an upload is hashed as it arrives, nothing of a
refused or broken upload is left behind, and a committed file sits at its content address."""

import asyncio
import hashlib

import pytest

from fedssl_registry.core.errors import InvalidInput, PayloadTooLarge
from fedssl_registry.storage import ArtifactStore


async def _chunks(*parts, fail_after=None):
    for i, part in enumerate(parts):
        if fail_after is not None and i == fail_after:
            raise ConnectionResetError("client went away")
        yield part


def _receive(store, *parts, limit=1 << 20, fail_after=None):
    return asyncio.run(store.receive(_chunks(*parts, fail_after=fail_after), limit))


def test_an_upload_is_hashed_as_it_arrives_and_committed_at_its_address(tmp_path):
    store = ArtifactStore(tmp_path)
    parts = (b"a" * 1000, b"b" * 3000, b"c")
    upload = _receive(store, *parts)
    data = b"".join(parts)
    assert upload.sha256 == hashlib.sha256(data).hexdigest() and upload.size == len(data)
    assert upload.path.parent == store.tmp and upload.path.read_bytes() == data
    store.commit(upload)
    assert store.path(upload.sha256).read_bytes() == data
    assert list(store.tmp.iterdir()) == []
    # The same bytes again: one file, the second upload dropped.
    again = _receive(store, data)
    store.commit(again)
    assert list(store.tmp.iterdir()) == [] and len(list(tmp_path.glob("??/*.safetensors"))) == 1


@pytest.mark.parametrize("case", ["too large", "empty", "disconnect"])
def test_a_refused_or_broken_upload_leaves_nothing(tmp_path, case):
    store = ArtifactStore(tmp_path)
    if case == "too large":
        with pytest.raises(PayloadTooLarge, match="exceeds 100 bytes"):
            _receive(store, b"x" * 60, b"x" * 60, limit=100)
    elif case == "empty":
        with pytest.raises(InvalidInput, match="empty"):
            _receive(store)
    else:
        with pytest.raises(ConnectionResetError):
            _receive(store, b"x" * 10, b"y" * 10, fail_after=1)
    assert list(store.tmp.iterdir()) == []
    assert list(tmp_path.glob("??/*")) == []
