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
from dataclasses import asdict, dataclass, field

import torch

from .errors import LoraCompileError
from .targets import DTYPES

DEVICES = ("auto", "cpu", "cuda")
# Every visible GPU: the model's layers are split across them (accelerate's device_map="auto"),
# for a model larger than one GPU. Inputs go to the first; each site's moments stay on its layer's GPU.
ALL_GPUS = "cuda:all"
MODEL_DTYPES = DTYPES  # the weights as loaded: the same names as a saved adapter's dtype
DEFAULT_DEVICE = "auto"
DEFAULT_MODEL_DTYPE = "float32"


def resolve_device(name: str | torch.device = DEFAULT_DEVICE) -> torch.device:
    """``auto`` (CUDA where there is one, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``cuda:all``.

    ``cuda:all`` resolves to the first GPU, where inputs go (``spreads`` tells it apart).
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name == ALL_GPUS:
        if torch.cuda.device_count() == 0:
            raise LoraCompileError(
                f"--device {ALL_GPUS}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu or auto"
            )
        return torch.device("cuda", 0)
    kind, _, index = name.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise LoraCompileError(f"unknown device {name!r}: use {', '.join(DEVICES)}, cuda:N or {ALL_GPUS}")
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


def spreads(name: str | torch.device) -> bool:
    """Whether ``--device`` asks for the model split across every visible GPU."""
    return str(name) == ALL_GPUS


def gpu_budget() -> dict[int, int]:
    """Accelerate's ``max_memory`` for a model split across the GPUs: each one's free memory, nothing elsewhere.

    No CPU or disk entry: offloaded layers would run at a fraction of the speed and their weights
    would not be where the passes read them, so a model that does not fit is refused instead.
    """
    return {i: device_memory_bytes(torch.device("cuda", i)) for i in range(torch.cuda.device_count())}


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
    """The peak memory of a pass, as the devices can tell it."""

    device: str  # the device, or the GPUs a split model is on ("cuda:0,cuda:1")
    peak_bytes: int = 0
    # CUDA: torch's largest allocation total on the device during the pass (the model's weights
    # included); a model split across GPUs: the sum of each GPU's peak (an upper bound of the
    # peaks' sum at any one time), each in ``per_device``. CPU: the process's peak resident set
    # since it started (the kernel keeps no resettable peak), so it also counts whatever ran
    # before in the same process.
    measure: str = ""
    per_device: dict[str, int] = field(default_factory=dict)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30

    def read(self) -> PeakMemory:
        """Fill in the peak so far (since ``peak_memory`` began)."""
        devices = [torch.device(d) for d in self.device.split(",")]
        if devices[0].type == "cuda":
            for device in devices:
                torch.cuda.synchronize(device)
                self.per_device[str(device)] = int(torch.cuda.max_memory_allocated(device))
            self.peak_bytes = sum(self.per_device.values())
            names = sorted({torch.cuda.get_device_name(d) for d in devices})
            self.measure = f"torch.cuda.max_memory_allocated on {', '.join(names)}" + (
                f" (sum over {len(devices)} GPUs)" if len(devices) > 1 else ""
            )
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
def peak_memory(devices: torch.device | list[torch.device]) -> Iterator[PeakMemory]:
    """Measure the peak memory of the block on ``devices`` (a model's, ``LoadedModel.devices``); filled in on exit."""
    devices = [devices] if isinstance(devices, torch.device) else list(devices)
    peak = PeakMemory(",".join(str(d) for d in devices))
    for device in devices:
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
