"""Writing outputs atomically: a failed run leaves nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LoraCompileError


def check_writable(path: str | Path, force: bool) -> Path:
    path = Path(path)
    if path.exists() and not force:
        kind = "directory" if path.is_dir() else "file"
        raise LoraCompileError(f"output {kind} {path} already exists: choose another path or pass --force")
    if not path.parent.exists():
        raise LoraCompileError(f"parent directory {path.parent} does not exist: create it first")
    return path


@contextmanager
def atomic_dir(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it becomes ``path``."""
    path = check_writable(path, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextmanager
def atomic_file(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success it replaces ``path``."""
    path = check_writable(path, force)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` with the metadata in sorted order.

    safetensors keeps metadata in a hash map whose order changes from process to
    process; sorting it makes the same vector give the same bytes.
    """
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    Path(path).write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size :])
