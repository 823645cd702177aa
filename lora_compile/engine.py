"""llama.cpp as a second engine: its own converter makes the GGUF LoRA, its own kernels run it.

Two things live here. ``convert_to_gguf`` turns a compiled (PEFT) adapter into a GGUF LoRA with
llama.cpp's ``convert_lora_to_gguf.py``, called as llama.cpp ships it, never rewritten: the
converter needs only the base model's ``config.json``, which is written from the loaded model
into a temporary directory (no download). ``LlamaCppModel`` runs a GGUF model in
llama-cpp-python and returns raw logits for given token ids, with a GGUF LoRA and/or a
llama.cpp control vector applied, so the compiled adapter can be judged against llama.cpp's
own activation addition inside one engine (``scripts/measure_llamacpp.py``).

The converter is not part of the llama-cpp-python wheel; ``scripts/setup_engine.sh`` builds
the pinned llama-cpp-python from its source package and unpacks the converter (with its
``conversion/`` package and ``gguf-py``) from the same source into ``converter_dir()``.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .errors import LoraCompileError
from .outputs import atomic_file, check_writable
from .targets import read_adapter

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CONVERTER = "convert_lora_to_gguf.py"
CONVERTER_ENV = "LORA_COMPILE_LLAMA_CPP"  # a directory holding convert_lora_to_gguf.py
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def default_converter_dir() -> Path:
    """Where ``scripts/setup_engine.sh`` unpacks llama.cpp's converter (a cache directory of ours)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lora-compile" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def converter_dir(directory: str | Path | None = None) -> Path:
    """The llama.cpp checkout whose converter is used: the argument, $LORA_COMPILE_LLAMA_CPP, or the cache."""
    chosen = Path(directory or os.environ.get(CONVERTER_ENV) or default_converter_dir()).expanduser()
    if not (chosen / CONVERTER).is_file():
        raise LoraCompileError(
            f"llama.cpp's {CONVERTER} is not in {chosen}: run scripts/setup_engine.sh, or pass --llama-cpp "
            f"(or set {CONVERTER_ENV}) to a llama.cpp source directory"
        )
    return chosen


def write_base_config(config, directory: Path) -> Path:
    """The base model's ``config.json``: all the converter reads of the base model (to map tensor names).

    ``config``: a transformers config (``models.load_config``: no weights are loaded). A model read
    from a GGUF file has no ``architectures`` entry, and the converter picks its tensor mapping by
    it, so it is taken from transformers' own causal-LM class for the model type.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    data = config.to_dict()
    if not data.get("architectures"):
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(data.get("model_type", ""))
        data["architectures"] = [name] if name else None
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or "exception" in ln.lower()]
    return (errors or lines or ["no output"])[-1]


def convert_to_gguf(
    adapter_dir: str | Path,
    out: str | Path,
    config,
    *,
    outtype: str = "f32",
    llama_cpp: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Convert a compiled PEFT adapter into a GGUF LoRA with llama.cpp's own converter.

    ``config``: the base model's transformers config (``models.load_config``), all the converter needs. ``outtype``: the
    GGUF tensor type (f32 keeps the adapter exact; llama.cpp applies it beside the quantised
    base weights). Written atomically: the converter writes a temporary that is renamed into place.
    """
    if outtype not in GGUF_OUTTYPES:
        raise LoraCompileError(f"unknown GGUF type {outtype!r}: use one of {', '.join(GGUF_OUTTYPES)}")
    check_writable(out, force)
    adapter_dir = Path(adapter_dir)
    read_adapter(adapter_dir)  # refuses a missing, unreadable or pickle adapter with our own message
    converter = converter_dir(llama_cpp) / CONVERTER
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # never a download
    with tempfile.TemporaryDirectory(prefix="lora-compile-base-") as base, atomic_file(out, force) as tmp:
        write_base_config(config, Path(base))
        cmd = [sys.executable, str(converter), str(adapter_dir), "--base", base, "--outfile", str(tmp)]
        done = subprocess.run(cmd + ["--outtype", outtype], env=env, capture_output=True, text=True)
        if done.returncode != 0 or not tmp.is_file():
            raise LoraCompileError(
                f"llama.cpp's converter refused {adapter_dir}: {_last_error_line(done.stderr + done.stdout)}"
            )
    return Path(out)


# ---- running GGUF models in llama.cpp --------------------------------------------------------


def llama_cpp_module():
    """The ``llama_cpp`` package, or a one-line error saying how to get it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise LoraCompileError(
            f"llama-cpp-python is not installed ({exc}): run scripts/setup_engine.sh "
            f"(llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}, built from source)"
        ) from exc
    return llama_cpp


def read_control_vector(path: str | Path, n_embd: int, n_layer: int, strength: float = 1.0) -> np.ndarray:
    """A control vector GGUF as the buffer llama.cpp's ``llama_set_adapter_cvec`` takes.

    The layout of llama.cpp's own loader (``common_control_vector_load``): ``direction.N``
    scaled by the strength at offset ``(N − 1)·n_embd``, i.e. added to the output of block N.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    data = np.zeros((n_layer - 1) * n_embd, dtype=np.float32)
    for tensor in reader.tensors:
        layer = int(tensor.name.split(".")[-1])
        if not 1 <= layer < n_layer or tensor.n_elements != n_embd:
            raise LoraCompileError(f"{path}: {tensor.name} does not fit a model of {n_layer} layers × {n_embd}")
        data[(layer - 1) * n_embd : layer * n_embd] += strength * np.asarray(tensor.data, dtype=np.float32)
    return data


class LlamaCppModel:
    """A GGUF model in llama.cpp (CPU), returning raw logits for token ids, every position.

    ``lora``: a GGUF LoRA applied at ``lora_scale``; ``control_vector``: a control vector GGUF
    applied at ``strength`` (llama.cpp's ``--control-vector-scaled``).
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        lora: str | Path | None = None,
        lora_scale: float = 1.0,
        control_vector: str | Path | None = None,
        strength: float = 1.0,
        n_ctx: int = 512,
        n_threads: int | None = None,
    ):
        llama_cpp = llama_cpp_module()
        self._lib = llama_cpp.llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(model_path),
            lora_path=None if lora is None else str(lora),
            lora_scale=lora_scale,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_threads=n_threads or max(1, int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count() or 1),
            logits_all=True,
            verbose=False,
        )
        if control_vector is not None:
            n_embd, n_layer = self.llm.n_embd(), self._lib.llama_model_n_layer(self.llm.model)
            self._cvec = read_control_vector(control_vector, n_embd, n_layer, strength)
            pointer = self._cvec.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            if self._lib.llama_set_adapter_cvec(self.llm.ctx, pointer, self._cvec.size, n_embd, 1, n_layer):
                raise LoraCompileError(f"llama.cpp refused the control vector {control_vector}")

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits ``[len(tokens), vocab]``: row i predicts token i+1."""
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def greedy(self, tokens: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation (argmax of every next-token distribution), stopping at end of sequence."""
        self.llm.reset()
        self.llm.eval(tokens)
        out: list[int] = []
        eos = self.llm.token_eos()
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(nxt)  # kept, as transformers' generate keeps it, so counts compare
            if nxt == eos:
                break
            self.llm.eval([nxt])
        return out

    def close(self) -> None:
        self.llm.close()
