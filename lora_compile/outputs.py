"""Writing outputs atomically: a failed, interrupted or raced run leaves nothing half-written.

Every output is written into a hidden temporary beside its final path and renamed into
place at the end. Without ``--force`` the rename never replaces anything: when two runs
write the same output at once, the first to finish wins whole and the other fails with a
clear error. The few steps that must not be cut in two (renaming, cleaning up) run with
SIGINT/SIGTERM held back until they are done (``install_signal_handlers``, called by the CLI).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import Interrupted, LoraCompileError

# Signals that arrived inside a critical section, delivered when it ends.
_critical_depth = 0
_pending_signal: int | None = None


def _on_signal(signum: int, _frame) -> None:
    global _pending_signal
    if _critical_depth:
        _pending_signal = signum
        return
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM raise ``Interrupted`` (a KeyboardInterrupt), so cleanup runs; held in critical sections."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_signal)


@contextmanager
def critical() -> Iterator[None]:
    """A section that an interrupt may not cut: a signal arriving inside is raised when it ends."""
    global _critical_depth, _pending_signal
    _critical_depth += 1
    try:
        yield
    finally:
        _critical_depth -= 1
        if not _critical_depth and _pending_signal is not None:
            signum, _pending_signal = _pending_signal, None
            raise Interrupted(signum)


def check_writable(path: str | Path, force: bool) -> Path:
    """Refuse an output path early (before any model is loaded) if it cannot be written."""
    path = Path(path)
    if path.exists() and not force:
        kind = "directory" if path.is_dir() else "file"
        raise LoraCompileError(f"output {kind} {path} already exists: choose another path or pass --force")
    parent = path.parent
    if not parent.exists():
        raise LoraCompileError(f"parent directory {parent} does not exist: create it first")
    if not parent.is_dir():
        raise LoraCompileError(f"{parent} is not a directory: choose an output path inside a directory")
    try:  # os.access says yes to root on a read-only directory: try it instead
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise LoraCompileError(
            f"cannot write in {parent} ({exc.strerror}): choose an output path in a writable directory"
        ) from None
    return path


def _raced(path: Path) -> LoraCompileError:
    return LoraCompileError(
        f"{path} appeared while this run was writing it (another run at the same time?): it was left as it is; "
        "choose another path or pass --force"
    )


def _commit(tmp: Path, path: Path, force: bool) -> None:
    """Rename ``tmp`` to ``path``. Without ``force`` an existing ``path`` is never replaced."""
    if not force:
        if tmp.is_dir():
            if path.exists():
                raise _raced(path)
            try:
                os.rename(tmp, path)  # fails on an existing file or non-empty directory: never a mixture
            except OSError:
                raise _raced(path) from None
        else:
            try:
                os.link(tmp, path)  # atomic, and refuses an existing path
            except FileExistsError:
                raise _raced(path) from None
            os.unlink(tmp)
        return
    if tmp.is_dir() and path.exists():
        # os.replace cannot put a directory over a non-empty one: move the old one aside first.
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
        try:
            os.replace(path, old / "x")
            os.rename(tmp, path)
        except OSError:
            if (old / "x").exists() and not path.exists():
                os.replace(old / "x", path)
            raise _raced(path) from None
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.replace(tmp, path)
        except OSError:
            raise _raced(path) from None


def _default_mode(path: Path) -> None:
    """mkstemp/mkdtemp make owner-only temporaries; an output gets the usual umask-based mode."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _remove(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp.exists():
        tmp.unlink()


@contextmanager
def atomic_outputs(paths: list[str | Path], force: bool = False, directory: bool = False) -> Iterator[list[Path]]:
    """Temporary paths beside each of ``paths`` (directories if ``directory``); on success they become ``paths``.

    On any error or interrupt the temporaries are removed and nothing is renamed into place;
    with several outputs, all are committed together at the end.
    """
    finals = [check_writable(p, force) for p in paths]
    temps: list[Path] = []
    try:
        for path in finals:
            with critical():  # created and recorded together, so an interrupt cannot orphan one
                if directory:
                    temps.append(Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)))
                else:
                    # the temporary keeps the suffix: matplotlib chooses the image format by it
                    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
                    os.close(fd)
                    temps.append(Path(name))
                _default_mode(temps[-1])
        yield temps
        with critical():
            for tmp, path in zip(temps, finals):
                _commit(tmp, path, force)
    finally:
        with critical():
            for tmp in temps:
                _remove(tmp)


@contextmanager
def atomic_dir(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it becomes ``path``."""
    with atomic_outputs([path], force, directory=True) as (tmp,):
        yield tmp


@contextmanager
def atomic_file(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success it replaces ``path``."""
    with atomic_outputs([path], force) as (tmp,):
        yield tmp


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
