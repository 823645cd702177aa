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
from pathlib import Path

import torch
from torch import nn

from .errors import LoraCompileError
from .models import LoadedModel
from .outputs import atomic_dir
from .targets import KEY_PREFIX, read_adapter, scale

_A_SUFFIXES = (".lora_A.weight", ".lora_embedding_A")


def adapter_deltas(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
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
    return deltas


def _untie_output_embeddings(model: nn.Module) -> None:
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is embedding.weight:
        head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False


def merged_model(loaded: LoadedModel, deltas: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of the model with ``adapter_deltas`` merged into its weights (the loaded model is untouched)."""
    model = copy.deepcopy(loaded.model)
    # A GGUF file loads dequantised but keeps its (unserialisable) quantizer: the copy is plain weights.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for path, delta in deltas.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise LoraCompileError(f"the adapter targets {path}, which {loaded.name} lacks: wrong base model") from None
        if module is model.get_input_embeddings():
            _untie_output_embeddings(model)
        if tuple(delta.shape) != tuple(module.weight.shape):
            raise LoraCompileError(
                f"the adapter's delta for {path} has shape {tuple(delta.shape)}, the model's weight "
                f"{tuple(module.weight.shape)}: wrong base model"
            )
        weight = module.weight
        weight.data = (weight.data.double() + delta.to(weight.device)).to(weight.dtype)
    return model


def write_merged(
    loaded: LoadedModel, deltas: dict[str, torch.Tensor], out_dir: str | Path, force: bool = False
) -> Path:
    """Write the merged model (safetensors, config, tokenizer) atomically to ``out_dir``."""
    model = merged_model(loaded, deltas)
    with atomic_dir(out_dir, force) as tmp:
        save_merged(model, loaded, tmp)
    return Path(out_dir)


def save_merged(model: nn.Module, loaded: LoadedModel, directory: Path) -> None:
    """A merged model's files in an existing (temporary) directory."""
    model.save_pretrained(str(directory), safe_serialization=True)
    loaded.tokenizer.save_pretrained(str(directory))
