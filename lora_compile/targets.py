"""Serving targets: what each LoRA server accepts, in one table, and the linter that checks an adapter against it.

Every rule cites what it is based on (DESIGN §5 summarises them):

- PEFT (``peft/tuners/lora``): the reference loader; reads everything it writes (DoRA, lora_bias,
  rank/alpha patterns, rsLoRA ``alpha/√r``, ``modules_to_save``, embedding LoRA).
- vLLM (``vllm/lora/peft_helper.py``): requires ``r``, ``lora_alpha``, ``target_modules``; rejects
  ``modules_to_save``, ``use_dora``, ``bias != "none"`` and ``r > --max-lora-rank`` (default 16);
  drops config fields it does not know, so ``rank_pattern``/``alpha_pattern`` are silently ignored;
  honours ``use_rslora``. Keys: ``lora_A/B.weight`` and ``lora_embedding_A/B``. Removed lora_bias.
- SGLang (``srt/lora``, docs "LoRA Serving"): ``target_modules`` a list (or "all"/"all-linear"),
  scaling ``lora_alpha / r`` (``use_rslora`` ignored); ``--max-lora-rank`` inferred from the adapters.
- LoRAX and TGI (TGI docs "LoRA", LoRAX adapter loading): PEFT LoRA on the linear projections; a
  module type missing weights for any layer is dropped whole; no embedding LoRA.
- Fireworks (docs "Importing fine-tuned models"): ``r`` an integer in [4, 64]; ``target_modules`` a
  list of q/k/v/o/gate/up/down projections; other fields are ignored (so no DoRA, bias, patterns).
- Together (docs "Adapter upload"): ``adapter_config.json`` + ``adapter_model.safetensors`` for a
  supported base model, served in BF16/FP8; nothing else documented, so the conservative PEFT subset.
- llama.cpp (``convert_lora_to_gguf.py``): only ``lora_A/B.weight`` and ``lora_embedding_A/B``
  tensors (anything else aborts); reads ``lora_alpha`` (required) and scales by ``alpha / rank``
  with one alpha for all tensors (``alpha_pattern`` and ``use_rslora`` ignored).
- portable (ours): what all of the above accept. Rank padded with zeros to 4 (Fireworks' minimum,
  within vLLM's default 16): zero rows of A and columns of B leave ``B·A`` unchanged.
  ``lora_alpha = r`` gives scale 1 under every convention; every layer of a targeted module
  is present (LoRAX/TGI); no embedding LoRA (LoRAX, TGI and Fireworks have none).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .architectures import Architecture, architecture_for, is_transposed, module_features
from .errors import LoraCompileError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
DEFAULT_TARGET = "portable"
LINEAR_KEYS = (".lora_A.weight", ".lora_B.weight")
EMBEDDING_KEYS = (".lora_embedding_A", ".lora_embedding_B")
# The dtypes an adapter may be saved in, and the largest finite value of each (a server casting
# the adapter to the model dtype overflows to inf beyond it).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name a server or a saved adapter uses (float32, bfloat16, float16)."""
    if name not in DTYPES:
        raise LoraCompileError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


DTYPE_MAX = {name: float(torch.finfo(dt).max) for name, dt in DTYPES.items()}
# Config features beyond plain LoRA; a profile lists the ones its server implements.
FEATURES = {
    "lora_bias": lambda c: bool(c.get("lora_bias")),
    "use_dora": lambda c: bool(c.get("use_dora")),
    "bias": lambda c: c.get("bias", "none") != "none",
    "modules_to_save": lambda c: bool(c.get("modules_to_save")),
    "rank_pattern": lambda c: bool(c.get("rank_pattern")),
    "alpha_pattern": lambda c: bool(c.get("alpha_pattern")),
    "use_rslora": lambda c: bool(c.get("use_rslora")),
}
_FP16_SERVERS = ("float16", "bfloat16")
_LLAMA_PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


@dataclass(frozen=True)
class TargetProfile:
    """What one serving system accepts from a PEFT LoRA adapter."""

    name: str
    every_layer: bool  # a module type missing any layer is dropped
    embedding_lora: bool  # lora_embedding_A/B on embed_tokens
    min_rank: int = 1
    max_rank: int | None = None  # None: no limit of the server's own
    rank_note: str = ""  # how to serve a larger rank, or where the limit comes from
    target_modules: frozenset[str] | None = None  # short module names allowed; None: any module of the model
    # The server takes LoRA on each family's own projections (architectures table ``lora_modules``):
    # with the base model known, those names replace ``target_modules`` (kept for an unknown base).
    family_modules: bool = False
    features: frozenset[str] = frozenset()  # entries of FEATURES the server implements
    serve_dtypes: tuple[str, ...] = _FP16_SERVERS  # dtypes the server may cast the adapter to (range check)
    required: tuple[str, ...] = ("r", "lora_alpha", "target_modules")
    target_modules_list: bool = False  # target_modules must be a list, not a regex/"all-linear" string
    alpha_equals_rank: bool = False  # scale 1, identical under every convention
    default_dtype: str = "float32"

    def rank_for(self, rank: int) -> int:
        """The rank to emit a rank-``rank`` adapter at: zero-padded up to the minimum."""
        padded = max(rank, self.min_rank)
        if self.max_rank is not None and padded > self.max_rank:
            raise LoraCompileError(f"rank {rank} exceeds {self.name}'s maximum {self.max_rank} ({self.rank_note})")
        return padded

    def check_site(self, site: str) -> None:
        """Raise if this target cannot serve a LoRA at ``site`` (layer-0 input needs embedding LoRA)."""
        if site == "resid_pre" and not self.embedding_lora:
            accepting = ", ".join(p.name for p in PROFILES.values() if p.embedding_lora)
            raise LoraCompileError(
                f"target {self.name!r} does not accept embedding LoRA, which site resid_pre needs: "
                f"use --target {accepting.replace(', ', ' / ')}, or another site"
            )

    def check_dtype(self, dtype: str) -> None:
        torch_dtype(dtype)


PROFILES: dict[str, TargetProfile] = {
    p.name: p
    for p in (
        TargetProfile(
            "portable",
            min_rank=4,
            max_rank=16,
            rank_note="Fireworks needs r ≥ 4, vLLM's default --max-lora-rank is 16",
            every_layer=True,
            target_modules=_LLAMA_PROJECTIONS,
            family_modules=True,
            embedding_lora=False,
            target_modules_list=True,
            alpha_equals_rank=True,
        ),
        TargetProfile(
            "peft",
            every_layer=False,
            embedding_lora=True,
            features=frozenset(FEATURES),
            required=("r", "target_modules"),  # PEFT would default them (r = 8), not to this adapter's
        ),
        TargetProfile(
            "vllm",
            max_rank=16,
            rank_note="vLLM's default --max-lora-rank; serve larger ranks with --max-lora-rank N",
            every_layer=False,
            embedding_lora=True,
            features=frozenset({"use_rslora"}),
        ),
        TargetProfile(
            "sglang",
            every_layer=False,
            embedding_lora=True,
        ),
        TargetProfile(
            "lorax",
            every_layer=True,
            target_modules=_LLAMA_PROJECTIONS,
            family_modules=True,
            embedding_lora=False,
        ),
        TargetProfile(
            "tgi",
            every_layer=True,
            target_modules=_LLAMA_PROJECTIONS,
            family_modules=True,
            embedding_lora=False,
        ),
        TargetProfile(
            "fireworks",
            min_rank=4,
            max_rank=64,
            rank_note="Fireworks requires r between 4 and 64",
            every_layer=False,
            target_modules=_LLAMA_PROJECTIONS | {"w1", "w2", "w3", "gate"},  # + Mixtral's, as its docs list
            embedding_lora=False,
            serve_dtypes=("bfloat16",),
            required=("r", "target_modules"),
            target_modules_list=True,
        ),
        TargetProfile(
            "together",
            every_layer=False,
            target_modules=_LLAMA_PROJECTIONS,
            embedding_lora=False,
            serve_dtypes=("bfloat16",),
            target_modules_list=True,
        ),
        TargetProfile(
            "llamacpp",
            every_layer=False,
            embedding_lora=True,
            features=frozenset({"rank_pattern"}),  # ranks come from the tensor shapes
            serve_dtypes=("float16",),  # --outtype f16, and f16 compute on many backends
            required=("lora_alpha",),
        ),
    )
}


def profile(name: str) -> TargetProfile:
    """The profile called ``name``; a one-line error listing the targets otherwise."""
    if name not in PROFILES:
        raise LoraCompileError(f"unknown target {name!r}: use one of {', '.join(PROFILES)}")
    return PROFILES[name]


@dataclass
class Adapter:
    """An adapter directory as read from disk."""

    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]


def read_adapter(path: str | Path) -> Adapter:
    """Read adapter_config.json and adapter_model.safetensors, or raise a one-line error."""
    path = Path(path)
    config_path, weights_path = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise LoraCompileError(f"{path} is not an adapter directory (no {ADAPTER_CONFIG})")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoraCompileError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise LoraCompileError(f"{config_path} is not a PEFT LoRA config (peft_type must be LORA)")
    if not weights_path.is_file():
        raise LoraCompileError(f"{path} has no {ADAPTER_WEIGHTS}: save the adapter with safetensors")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise LoraCompileError(f"cannot read {weights_path}: {exc}") from exc
    return Adapter(path, config, tensors)


def _module_path(key: str) -> str:
    return key[len(KEY_PREFIX) :].split(".lora_")[0] if key.startswith(KEY_PREFIX) else key.split(".lora_")[0]


def _short(module_path: str) -> str:
    return module_path.rsplit(".", 1)[-1]


def _layer(module_path: str) -> int | None:
    match = re.search(r"\.(\d+)\.", module_path)
    return int(match.group(1)) if match else None


def _value_problems(tensors: dict[str, torch.Tensor], prof: TargetProfile) -> list[str]:
    problems = []
    for key, value in sorted(tensors.items()):
        dtype = str(value.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            problems.append(f"tensor {key} is {dtype}, not one of {', '.join(DTYPES)}")
            continue
        if not bool(torch.isfinite(value).all()):
            problems.append(f"tensor {key} has inf or NaN values")
            continue
        peak = float(value.abs().max()) if value.numel() else 0.0
        for serve in prof.serve_dtypes:
            if peak > DTYPE_MAX[serve]:
                problems.append(f"tensor {key} overflows {serve} (max |value| {peak:.3g}) when the server casts it")
    return problems


def _shape_problems(adapter: Adapter, base: torch.nn.Module | None, rank: int) -> list[str]:
    """A [r, in] / B [out, r] (embedding A [r, vocab] / B [hidden, r]) against the base modules."""
    problems = []
    rank_pattern = adapter.config.get("rank_pattern") or {}
    for key, value in sorted(adapter.tensors.items()):
        module = _module_path(key)
        r = next((int(v) for k, v in rank_pattern.items() if re.search(rf"(^|\.){re.escape(k)}$", module)), rank)
        is_a = ".lora_A." in key or key.endswith(".lora_embedding_A")
        if value.dim() != 2 or (value.shape[0] if is_a else value.shape[1]) != r:
            problems.append(f"tensor {key} has shape {list(value.shape)}: its rank dimension is not r = {r}")
            continue
        if base is None:
            continue
        try:
            layer = base.get_submodule(module)
        except AttributeError:
            problems.append(f"tensor {key}: the base model has no module {module}")
            continue
        features = module_features(layer)
        if features is None:
            problems.append(f"tensor {key}: {module} is a {type(layer).__name__}, not a module LoRA takes")
            continue
        expected = [r, features[0]] if is_a else [features[1], r]
        if list(value.shape) != expected:
            problems.append(f"tensor {key} has shape {list(value.shape)}, the base model needs {expected}")
    return problems


def _architecture(base: torch.nn.Module | None) -> Architecture | None:
    """The architecture table's entry for the base model, None where unknown (any PEFT adapter may be linted)."""
    config = getattr(base, "config", None)
    if config is None:
        return None
    try:
        return architecture_for(config.model_type, config)
    except LoraCompileError:
        return None


def _layout_problems(config: dict, modules: set[str], base: torch.nn.Module | None) -> list[str]:
    """``fan_in_fan_out`` against the targeted modules' weight layout (GPT-2's Conv1D stores [in, out]).

    PEFT corrects a wrong flag with a warning when it loads the adapter, but merges (PEFT's
    ``merge_and_unload`` before that correction, ours, a server folding weights) transpose by it.
    """
    if base is None:
        return []
    flag = bool(config.get("fan_in_fan_out", False))
    problems = []
    for module in sorted(modules):
        try:
            layer = base.get_submodule(module)
        except AttributeError:
            continue  # reported by the shape checks
        if isinstance(layer, torch.nn.Embedding) or module_features(layer) is None:
            continue
        if is_transposed(layer) != flag:
            kind = "a Conv1D (weight [in, out])" if is_transposed(layer) else "a Linear (weight [out, in])"
            problems.append(
                f"fan_in_fan_out is {str(flag).lower()} but {module} is {kind}: set it to {str(not flag).lower()}"
            )
    return problems


def lint(adapter: Adapter, prof: TargetProfile, base: torch.nn.Module | None = None) -> list[str]:
    """Everything in ``adapter`` that ``prof``'s server rejects or would serve differently; empty if none.

    ``base``: the base model's module tree (a meta-device model is enough) for shape and layer
    checks; without it, shapes are checked only against ``r``.
    """
    config, tensors = adapter.config, adapter.tensors
    problems = [f"config lacks {key!r}" for key in prof.required if key not in config]
    for feature, is_set in FEATURES.items():
        if is_set(config) and feature not in prof.features:
            value = config.get(feature)
            problems.append(f"{feature} is {value!r}: {prof.name} does not support it")
    # Without r, a server that reads it falls back to PEFT's default 8 (flagged above as missing);
    # llama.cpp takes the rank from the tensors, as do the shape checks here.
    a_rows = [v.shape[0] for k, v in sorted(tensors.items()) if k.endswith((".lora_A.weight", ".lora_embedding_A"))]
    rank = config.get("r", a_rows[0] if a_rows else 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        return [*problems, f"r is {rank!r}, not a positive integer"]
    if rank < prof.min_rank or (prof.max_rank is not None and rank > prof.max_rank):
        bounds = f"between {prof.min_rank} and {prof.max_rank}" if prof.max_rank else f"at least {prof.min_rank}"
        problems.append(f"rank {rank} is outside {prof.name}'s range: r must be {bounds} ({prof.rank_note})")
    alpha = config.get("lora_alpha")
    if prof.alpha_equals_rank and alpha != rank:
        problems.append(f"lora_alpha {alpha} != r {rank}: the scale differs between serving conventions")
    targets = config.get("target_modules")
    if prof.target_modules_list and not isinstance(targets, list):
        problems.append(f"target_modules is {targets!r}, not a list of module names")
    target_set = set(targets) if isinstance(targets, list) else set()

    allowed = LINEAR_KEYS + (EMBEDDING_KEYS if prof.embedding_lora else ())
    for key in sorted(tensors):
        if not key.startswith(KEY_PREFIX) or not key.endswith(allowed):
            kinds = "lora_A/lora_B" + ("/lora_embedding" if prof.embedding_lora else "")
            problems.append(f"tensor {key} is not a {kinds} key {prof.name} reads")
    modules = {_module_path(k) for k in tensors if k.endswith(LINEAR_KEYS + EMBEDDING_KEYS)}
    shorts = {_short(m) for m in modules}
    if isinstance(targets, list) and shorts - target_set:
        problems.append(f"tensors for modules {sorted(shorts - target_set)} not in target_modules")
    arch = _architecture(base)
    allowed_modules = arch.lora_modules if arch is not None and prof.family_modules else prof.target_modules
    if allowed_modules is not None and (shorts | target_set) - allowed_modules:
        family = f" for {arch.name}" if arch is not None and prof.family_modules else ""
        problems.append(
            f"modules {sorted((shorts | target_set) - allowed_modules)} are not among {prof.name}'s "
            f"LoRA targets{family} ({', '.join(sorted(allowed_modules))})"
        )
    problems += _layout_problems(config, modules, base)
    for module in sorted(modules):
        for kind in ("A", "B"):
            if not any(k.startswith(f"{KEY_PREFIX}{module}.lora_") and f"_{kind}" in k for k in tensors):
                problems.append(f"{module} has no lora_{kind} tensor")

    if prof.every_layer:
        num_layers = getattr(getattr(base, "config", None), "num_hidden_layers", None) if base is not None else None
        for short in sorted(shorts):
            layers = {_layer(m) for m in modules if _short(m) == short} - {None}
            expected = set(range(num_layers if num_layers else max(layers, default=-1) + 1))
            if layers and layers != expected:
                problems.append(
                    f"{short} lacks layers {sorted(expected - layers)}: {prof.name} drops a module type "
                    "missing any layer (emit zeros there)"
                )
    problems += _shape_problems(adapter, base, rank)
    problems += _value_problems(tensors, prof)
    return problems


def meta_model(config) -> torch.nn.Module:
    """The base model's module tree on the meta device: shapes without weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def scale(config: dict) -> float:
    """The LoRA scaling PEFT applies: alpha/r, or alpha/√r with rsLoRA."""
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
