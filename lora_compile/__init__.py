"""lora_compile: compile activation-steering vectors into rank-1 LoRA adapters."""

from .api import CompileResult, compile_adapter, extract_vector, scan, sweep, verify_adapter
from .errors import LoraCompileError
from .extract import ContrastPair, read_pairs
from .models import LoadedModel, load_model
from .sweep import SweepResult
from .vectors import SteeringVector, load_vector, save_vector

__all__ = [
    "CompileResult",
    "ContrastPair",
    "LoadedModel",
    "LoraCompileError",
    "SteeringVector",
    "SweepResult",
    "compile_adapter",
    "extract_vector",
    "load_model",
    "load_vector",
    "read_pairs",
    "save_vector",
    "scan",
    "sweep",
    "verify_adapter",
]
__version__ = "0.1.0"
