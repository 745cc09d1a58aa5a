"""Weight artifacts on disk, content-addressed: <artifact_dir>/<sha256[:2]>/<sha256>.safetensors.

An upload is streamed to a temp file in `.incoming/`, hashed as it arrives, fsynced once,
then renamed: a file at its final name is always complete. The database row that makes it a
version is written after, in one transaction, so a crash leaves at most an unreferenced file,
which start-up removes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import AsyncIterable
from dataclasses import dataclass
from pathlib import Path

from anyio import to_thread

from .core.errors import InvalidInput, PayloadTooLarge

log = logging.getLogger("fedssl.registry")


@dataclass(frozen=True)
class Upload:
    """A whole upload in `.incoming/`, fsynced, with its content address."""

    path: Path
    sha256: str
    size: int


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp = self.root / ".incoming"
        self.tmp.mkdir(exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.safetensors"

    def new_temp(self) -> tuple[int, Path]:
        fd, name = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        return fd, Path(name)

    async def receive(self, chunks: AsyncIterable[bytes], limit: int) -> Upload:
        """Write an upload's `chunks` to a new temp file, hashing them as they arrive, and fsync
        it (off the event loop). PayloadTooLarge past `limit` bytes, InvalidInput when empty;
        the temp file is removed on any failure, a client's disconnect included."""
        fd, temp = self.new_temp()
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"weights file exceeds {limit} bytes")
                    digest.update(chunk)
                    out.write(chunk)
                if size == 0:
                    raise InvalidInput("the uploaded weights file is empty")
                out.flush()
                await to_thread.run_sync(os.fsync, out.fileno())
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return Upload(temp, digest.hexdigest(), size)

    def commit(self, upload: Upload) -> None:
        """Move a received upload to its content address (where the same bytes already are,
        drop it); the directory entry is fsynced."""
        final = self.path(upload.sha256)
        final.parent.mkdir(exist_ok=True)
        if final.exists():
            upload.path.unlink()
            return
        os.replace(upload.path, final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def cleanup(self, referenced: set[str]) -> int:
        """Remove interrupted uploads and files no version references; returns how many."""
        removed = 0
        for part in self.tmp.glob("*"):
            part.unlink(missing_ok=True)
            removed += 1
        for f in self.root.glob("??/*.safetensors"):
            if f.stem not in referenced:
                f.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed %d interrupted or unreferenced artifact file(s)", removed)
        return removed
