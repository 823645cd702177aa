"""Emit pass: rank-1 LoRA weights from fitted directions, written as a PEFT adapter.

For a site with writer input direction ``b`` (``b·x ≈ 1``) and steering vector
``s``, the writer gets ``A = k·b`` and ``B = s/k`` with ``‖A‖ = ‖B‖`` (balanced for
bf16/fp16 range), so the LoRA adds ``B A x = (b·x) s ≈ s``. The adapter follows the
portable rules of DESIGN §5: ``lora_alpha = r`` (scale 1 under every convention),
``target_modules`` a list of short names, every layer of a targeted module present
(zeros where not steering), only ``lora_A`` / ``lora_B`` keys. The layer-0 input
(``resid_pre``) is an embedding LoRA instead: exact, nothing fitted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .models import LoadedModel
from .outputs import atomic_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT = "compile_report.json"
KEY_PREFIX = "base_model.model."
# vLLM's default --max-lora-rank; the portable adapter stays within it.
VLLM_DEFAULT_MAX_RANK = 16
_FP16_MAX = 65504.0


@dataclass
class SiteWeights:
    """One steered site: the fitted input direction and the vector to add."""

    site: str
    layer: int
    direction: torch.Tensor  # b, [sum of writer in_features], float64
    vector: torch.Tensor  # coef * s, [hidden], float32


def _short_name(module_path: str) -> str:
    return module_path.rsplit(".", 1)[-1]


def _writer_template_index(loaded: LoadedModel, short: str) -> tuple[str, str]:
    """The (site, writer template) whose writer module has this short name."""
    for site, spec in loaded.arch.sites.items():
        for template in spec.writers:
            if _short_name(template) == short:
                return site, template
    raise KeyError(short)


def embedding_tensors(loaded: LoadedModel, sw: SiteWeights, rank: int = 1) -> dict[str, torch.Tensor]:
    """``lora_embedding_A`` [r, vocab] = k·1 and ``lora_embedding_B`` [hidden, r] = s/k (PEFT's keys, no ``.weight``).

    PEFT's embedding LoRA adds ``scaling · B · A[:, token]`` = ``s`` for every token: exact.
    ``k`` is the power of two nearest the balancing factor (‖A‖ = ‖B‖), so ``k`` and ``s/k``
    are exact in binary floating point and ``B · A[:, t]`` reproduces ``s`` bit for bit.
    """
    (writer,) = loaded.arch.writers(sw.site, sw.layer)
    embedding = loaded.module(writer)
    vocab, hidden = embedding.num_embeddings, embedding.embedding_dim
    s = sw.vector.to(torch.float32)
    balanced = torch.sqrt(s.double().norm() / vocab**0.5).clamp_min(1e-30)
    k = float(2.0 ** torch.round(torch.log2(balanced)))
    a = torch.zeros(rank, vocab, dtype=torch.float32)
    b = torch.zeros(hidden, rank, dtype=torch.float32)
    a[0] = k
    b[:, 0] = s / k
    return {f"{KEY_PREFIX}{writer}.lora_embedding_A": a, f"{KEY_PREFIX}{writer}.lora_embedding_B": b}


def adapter_tensors(loaded: LoadedModel, steered: list[SiteWeights], rank: int = 1) -> dict[str, torch.Tensor]:
    """``lora_A`` / ``lora_B`` for every layer of every targeted writer module."""
    tensors: dict[str, torch.Tensor] = {}
    by_writer: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for sw in [sw for sw in steered if loaded.arch.site(sw.site).embedding]:
        tensors.update(embedding_tensors(loaded, sw, rank))
    steered = [sw for sw in steered if not loaded.arch.site(sw.site).embedding]
    for sw in steered:
        writers = loaded.arch.writers(sw.site, sw.layer)
        widths = [loaded.module(w).in_features for w in writers]
        b = sw.direction.to(torch.float64)
        s = sw.vector.to(torch.float64)
        k = torch.sqrt(s.norm() / b.norm().clamp_min(1e-30))
        for writer, part in zip(writers, torch.split(b, widths)):
            by_writer[writer] = (part * k, s / k)
    shorts = sorted({_short_name(w) for sw in steered for w in loaded.arch.writers(sw.site, sw.layer)})
    for short in shorts:
        _, template = _writer_template_index(loaded, short)
        for layer in range(loaded.num_layers):
            writer = template.format(L=layer)
            module = loaded.module(writer)
            a = torch.zeros(rank, module.in_features, dtype=torch.float32)
            bmat = torch.zeros(module.out_features, rank, dtype=torch.float32)
            if writer in by_writer:
                a_row, b_col = by_writer[writer]
                a[0] = a_row.to(torch.float32)
                bmat[:, 0] = b_col.to(torch.float32)
            tensors[f"{KEY_PREFIX}{writer}.lora_A.weight"] = a.contiguous()
            tensors[f"{KEY_PREFIX}{writer}.lora_B.weight"] = bmat.contiguous()
    return tensors


def adapter_config(base_model: str, target_modules: list[str], rank: int = 1) -> dict:
    """A PEFT LoRA config of long-standing keys only (read by PEFT, vLLM, SGLang, LoRAX, TGI)."""
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "target_modules": sorted(target_modules),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def write_adapter(
    out_dir: str | Path,
    tensors: dict[str, torch.Tensor],
    config: dict,
    report: dict,
    model_card: str,
    force: bool = False,
) -> Path:
    """Write the adapter directory atomically: all of it, or nothing."""
    with atomic_dir(out_dir, force) as tmp:
        save_file(dict(sorted(tensors.items())), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card)
    return Path(out_dir)


def portability_problems(adapter_dir: str | Path, max_rank: int = VLLM_DEFAULT_MAX_RANK) -> list[str]:
    """Rules of DESIGN §5 (vLLM's, plus the portable profile) this adapter breaks; empty if none."""
    adapter_dir = Path(adapter_dir)
    problems = []
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            problems.append(f"config lacks {key!r}")
    if config.get("lora_bias"):
        problems.append("lora_bias is set")
    if config.get("use_dora"):
        problems.append("use_dora is set")
    if config.get("bias", "none") != "none":
        problems.append(f"bias is {config.get('bias')!r}, not 'none'")
    if config.get("modules_to_save"):
        problems.append("modules_to_save is set")
    if int(config.get("r", 0)) > max_rank:
        problems.append(f"rank {config.get('r')} exceeds --max-lora-rank {max_rank}")
    if config.get("lora_alpha") != config.get("r"):
        problems.append("lora_alpha != r: the scale differs between serving conventions")
    if not isinstance(config.get("target_modules"), list):
        problems.append("target_modules is not a list")
    allowed = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
    for key, value in tensors.items():
        if not key.startswith(KEY_PREFIX) or not key.endswith(allowed):
            problems.append(f"tensor {key} is not a lora_A/lora_B/lora_embedding key")
        if value.is_floating_point() and value.abs().max() > _FP16_MAX:
            problems.append(f"tensor {key} overflows float16")
    targets = set(config.get("target_modules") or [])
    found = {k[len(KEY_PREFIX) :].split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors}
    if found - targets:
        problems.append(f"tensors for modules {sorted(found - targets)} not in target_modules")
    # LoRAX / TGI drop a module type that lacks weights for any layer.
    for short in sorted(found):
        layers = {int(m.group(1)) for k in tensors if (m := re.search(rf"\.(\d+)\.[^.]*\.?{short}\.lora_A", k))}
        if layers and layers != set(range(max(layers) + 1)):
            problems.append(f"{short} lacks layers {sorted(set(range(max(layers) + 1)) - layers)}")
    return problems
