"""lora_compile: compile activation-steering vectors into rank-1 LoRA adapters."""

from .api import (
    CompileResult,
    check_adapter,
    compile_adapter,
    export_gguf,
    extract_vector,
    import_vector,
    merge_adapter,
    scan,
    sweep,
    verify_adapter,
)
from .errors import LoraCompileError
from .extract import ContrastPair, read_pairs
from .models import LoadedModel, load_model
from .refine import RefineOptions, train_lora
from .sweep import SweepResult
from .targets import PROFILES, TargetProfile
from .vectors import SteeringVector, load_vector, save_vector

__all__ = [
    "CompileResult",
    "ContrastPair",
    "LoadedModel",
    "LoraCompileError",
    "PROFILES",
    "RefineOptions",
    "SteeringVector",
    "SweepResult",
    "TargetProfile",
    "check_adapter",
    "compile_adapter",
    "export_gguf",
    "extract_vector",
    "import_vector",
    "load_model",
    "load_vector",
    "merge_adapter",
    "read_pairs",
    "save_vector",
    "scan",
    "sweep",
    "train_lora",
    "verify_adapter",
]
__version__ = "0.1.0"
