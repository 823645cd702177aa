"""Where the model runs and in what precision, and how much memory a pass used.

The one place that turns ``--device`` / ``--model-dtype`` into torch objects, so the passes
only ever read ``loaded.device`` and ``loaded.dtype``.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from .errors import LoraCompileError
from .targets import DTYPES

DEVICES = ("auto", "cpu", "cuda")
MODEL_DTYPES = DTYPES  # the weights as loaded: the same names as a saved adapter's dtype
DEFAULT_DEVICE = "auto"
DEFAULT_MODEL_DTYPE = "float32"


def resolve_device(name: str | torch.device = DEFAULT_DEVICE) -> torch.device:
    """``auto`` (CUDA where there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if isinstance(name, torch.device):
        name = str(name)
    kind, _, index = name.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise LoraCompileError(f"unknown device {name!r}: use {', '.join(DEVICES)} (or cuda:N)")
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise LoraCompileError(
                f"--device {name}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu or auto"
            )
        if index and int(index) >= torch.cuda.device_count():
            raise LoraCompileError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device(name)


def model_dtype(name: str | torch.dtype = DEFAULT_MODEL_DTYPE) -> torch.dtype:
    """The dtype the model's weights are loaded in: float32, bfloat16 or float16."""
    if isinstance(name, torch.dtype):
        if name not in MODEL_DTYPES.values():
            raise LoraCompileError(f"unsupported model dtype {name}: use {', '.join(MODEL_DTYPES)}")
        return name
    if name not in MODEL_DTYPES:
        raise LoraCompileError(f"unknown model dtype {name!r}: use {', '.join(MODEL_DTYPES)}")
    return MODEL_DTYPES[name]


@dataclass
class PeakMemory:
    """The peak memory of a pass, as the device can tell it."""

    device: str
    peak_bytes: int = 0
    # CUDA: torch's largest allocation total on the device during the pass (the model's weights
    # included). CPU: the process's peak resident set since it started (the kernel keeps no
    # resettable peak), so it also counts whatever ran before in the same process.
    measure: str = ""

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30

    def read(self) -> PeakMemory:
        """Fill in the peak so far (since ``peak_memory`` began)."""
        if self.device.startswith("cuda"):
            device = torch.device(self.device)
            torch.cuda.synchronize(device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(device))
            self.measure = f"torch.cuda.max_memory_allocated on {torch.cuda.get_device_name(device)}"
        else:
            self.peak_bytes = _max_rss_bytes()
            self.measure = "peak RSS of the process (resource.getrusage)"
        return self

    def to_dict(self) -> dict:
        return {**asdict(self), "peak_gib": round(self.peak_gib, 3)}


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


@contextmanager
def peak_memory(device: torch.device) -> Iterator[PeakMemory]:
    """Measure the peak memory of the block on ``device``; the result is filled in on exit."""
    peak = PeakMemory(str(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield peak
    finally:
        peak.read()


def device_memory_bytes(device: torch.device) -> int:
    """Memory a plan may use on ``device``: free GPU memory, or the CPU's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Blocks torch's allocator holds but no tensor uses are free to us, not to the driver.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
