"""lora_compile: compile activation-steering vectors into rank-1 LoRA adapters."""

from .api import CompileResult, compile_adapter, extract_vector, merge_adapter, scan, verify_adapter
from .errors import LoraCompileError
from .models import LoadedModel, load_model
from .vectors import SteeringVector, load_vector, save_vector

__all__ = [
    "CompileResult",
    "LoadedModel",
    "LoraCompileError",
    "SteeringVector",
    "compile_adapter",
    "extract_vector",
    "load_model",
    "load_vector",
    "merge_adapter",
    "save_vector",
    "scan",
    "verify_adapter",
]
__version__ = "0.1.0"
