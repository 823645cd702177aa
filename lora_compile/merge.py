"""Merged export: the base model with a LoRA adapter folded into its weights.

For users who self-host without LoRA support. Each targeted weight becomes
``W + scaling·B·A`` (an embedding: ``W + scaling·(B·A)ᵀ``), computed in float64 and
rounded once to the model's dtype, so the merged model adds the same delta as the
base model with the adapter, to the precision of that dtype.

Tied embeddings (the output head shares the input embedding's weight) are untied
before an embedding LoRA is merged: the head keeps its own copy of the original
weight and the saved config says ``tie_word_embeddings: false``; merging into the
shared weight would steer the logits too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .architectures import is_transposed
from .errors import LoraCompileError
from .models import LoadedModel
from .outputs import atomic_dir
from .targets import KEY_PREFIX, read_adapter, scale

_A_SUFFIXES = (".lora_A.weight", ".lora_embedding_A")


@dataclass
class Deltas:
    """An adapter's weight deltas per module path, and the weight layout its config claims."""

    tensors: dict[str, torch.Tensor]
    fan_in_fan_out: bool = False


def adapter_deltas(adapter_dir: str | Path) -> Deltas:
    """``scaling·B·A`` per module path, float64, in the layout of that module's weight.

    A linear weight is ``[out, in]`` (``[in, out]`` where the config says ``fan_in_fan_out``,
    GPT-2's Conv1D); an embedding's is ``[vocab, hidden]``, the transpose of ``B·A``.
    """
    adapter = read_adapter(adapter_dir)
    config, tensors = adapter.config, adapter.tensors
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_dora"):
        raise LoraCompileError(f"{adapter_dir}: rank_pattern, alpha_pattern and DoRA adapters cannot be merged here")
    scaling = scale(config)
    deltas = {}
    for key, a in sorted(tensors.items()):
        suffix = next((s for s in _A_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        delta = scaling * (tensors[key.replace("_A", "_B")].double() @ a.double())
        transposed = suffix == ".lora_embedding_A" or config.get("fan_in_fan_out", False)
        deltas[key[len(KEY_PREFIX) : -len(suffix)]] = delta.T if transposed else delta
    return Deltas(deltas, bool(config.get("fan_in_fan_out", False)))


def _untie_output_embeddings(model: nn.Module) -> None:
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is embedding.weight:
        head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False


def merged_model(loaded: LoadedModel, deltas: Deltas) -> nn.Module:
    """A copy of the model with ``adapter_deltas`` merged into its weights (the loaded model is untouched).

    A linear module's layout must be the one the adapter's ``fan_in_fan_out`` says: a square
    Conv1D weight (GPT-2's ``attn.c_proj``) would take a wrongly flagged delta transposed, silently.
    """
    model = copy.deepcopy(loaded.model)
    # A GGUF file loads dequantised but keeps its (unserialisable) quantizer: the copy is plain weights.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for path, delta in deltas.tensors.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise LoraCompileError(f"the adapter targets {path}, which {loaded.name} lacks: wrong base model") from None
        if module is model.get_input_embeddings():
            _untie_output_embeddings(model)
        elif is_transposed(module) != deltas.fan_in_fan_out:
            layout = "[in, out] (a Conv1D)" if is_transposed(module) else "[out, in] (a Linear)"
            raise LoraCompileError(
                f"the adapter says fan_in_fan_out: {str(deltas.fan_in_fan_out).lower()}, but {path} stores its "
                f"weight as {layout}: fix fan_in_fan_out in adapter_config.json"
            )
        if tuple(delta.shape) != tuple(module.weight.shape):
            raise LoraCompileError(
                f"the adapter's delta for {path} has shape {tuple(delta.shape)}, the model's weight "
                f"{tuple(module.weight.shape)}: wrong base model"
            )
        weight = module.weight
        weight.data = (weight.data.double() + delta.to(weight.device)).to(weight.dtype)
    return model


def write_merged(loaded: LoadedModel, deltas: Deltas, out_dir: str | Path, force: bool = False) -> Path:
    """Write the merged model (safetensors, config, tokenizer) atomically to ``out_dir``."""
    model = merged_model(loaded, deltas)
    with atomic_dir(out_dir, force) as tmp:
        save_merged(model, loaded, tmp)
    return Path(out_dir)


def save_merged(model: nn.Module, loaded: LoadedModel, directory: Path) -> None:
    """A merged model's files in an existing (temporary) directory."""
    model.save_pretrained(str(directory), safe_serialization=True)
    loaded.tokenizer.save_pretrained(str(directory))
