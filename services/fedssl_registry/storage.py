"""Weight artifacts on disk, content-addressed: <artifact_dir>/<sha256[:2]>/<sha256>.safetensors.

An upload is streamed to a temp file, fsynced, then renamed: a file at its final name is
always complete. The database row that makes it a version is written after, in one
transaction, so a crash leaves at most an unreferenced file, which start-up removes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger("fedssl.registry")


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

    def commit(self, temp: Path) -> tuple[str, int]:
        """fsync and move a finished temp file to its content address; (sha256, size)."""
        h = hashlib.sha256()
        with temp.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
            os.fsync(fh.fileno())
        sha = h.hexdigest()
        final = self.path(sha)
        final.parent.mkdir(exist_ok=True)
        size = temp.stat().st_size
        if final.exists():
            temp.unlink()
        else:
            os.replace(temp, final)
            dir_fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return sha, size

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
