"""Emit pass: rank-1 LoRA weights from fitted directions, written as a PEFT adapter.

For a site with writer input direction ``b`` (``b·x ≈ 1``) and steering vector
``s``, the writer gets ``A = k·b`` and ``B = s/k`` with ``‖A‖ = ‖B‖`` (balanced for
bf16/fp16 range), so the LoRA adds ``B A x = (b·x) s ≈ s``. The serving target's profile
(targets.py) sets the rank (zero-padded: extra zero rows of A and columns of B leave ``B A``
unchanged), the saved dtype and whether every layer of a targeted module is present (zeros
where not steering); ``lora_alpha = r`` (scale 1 under every convention), ``target_modules`` a
list of short names, only ``lora_A`` / ``lora_B`` keys.
The layer-0 input (``resid_pre``) is an embedding LoRA instead: exact, nothing fitted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .architectures import module_features, writer_features
from .errors import LoraCompileError
from .models import LoadedModel
from .outputs import atomic_dir
from .targets import ADAPTER_CONFIG, ADAPTER_WEIGHTS, DEFAULT_TARGET, DTYPES, KEY_PREFIX, PROFILES, TargetProfile

REPORT = "compile_report.json"
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module → (A [r, in], B [out, r])


@dataclass
class SiteWeights:
    """One steered site: the fitted input direction and the vector to add."""

    site: str
    layer: int
    direction: torch.Tensor  # b, [sum of writer in_features], float64
    vector: torch.Tensor  # coef * s, [hidden], float32


def _short_name(module_path: str) -> str:
    return module_path.rsplit(".", 1)[-1]


def _targeted_modules(loaded: LoadedModel, short: str, layers: set[int]) -> list[str]:
    """Every LoRA-able module of ``layers`` that the target name ``short`` matches, in model order.

    Servers match ``target_modules`` by the last part of a module's name, so a name can cover
    more modules than the steered writers (GPT-2's ``c_proj``: ``attn.c_proj`` and ``mlp.c_proj``);
    each gets tensors (zeros where not steering), so no server initialises or drops any of them.
    """
    prefix = f"{loaded.arch.layers}."
    found = []
    for name, module in loaded.model.named_modules():
        if _short_name(name) != short or not name.startswith(prefix) or module_features(module) is None:
            continue
        if int(name[len(prefix) :].split(".", 1)[0]) in layers:
            found.append(name)
    return found


def embedding_scale(loaded: LoadedModel, site: str, layer: int) -> float:
    """What the embedding multiplies its output by (Gemma: √d), in the embedding's dtype as its forward does.

    PEFT (``_get_embed_scale``) and servers (vLLM multiplies the embedding output, LoRA included, by
    the normaliser) scale the embedding LoRA's output by it too: B must be ``s / scale``.
    """
    spec = loaded.arch.site_at(site, layer)
    if spec.embed_scale is None:
        return 1.0
    module = loaded.module(loaded.arch.writers(site, layer)[0])
    return float(torch.as_tensor(getattr(module, spec.embed_scale)).to(module.weight.dtype))


def embedding_tensors(loaded: LoadedModel, sw: SiteWeights, rank: int = 1) -> dict[str, torch.Tensor]:
    """``lora_embedding_A`` [r, vocab] = k·1 and ``lora_embedding_B`` [hidden, r] = s/k (PEFT's keys, no ``.weight``).

    PEFT's embedding LoRA adds ``scaling · B · A[:, token]`` = ``s`` for every token: exact. Where the
    embedding scales its output (Gemma), B is ``s / scale``: the LoRA's output is scaled with it.
    ``k`` is the power of two nearest the balancing factor (‖A‖ = ‖B‖), so ``k`` and ``s/k``
    are exact in binary floating point and ``B · A[:, t]`` reproduces ``s`` bit for bit.
    """
    (writer,) = loaded.arch.writers(sw.site, sw.layer)
    embedding = loaded.module(writer)
    vocab, hidden = embedding.num_embeddings, embedding.embedding_dim
    s = sw.vector.to(torch.float32)
    scale = embedding_scale(loaded, sw.site, sw.layer)
    if scale != 1.0:
        s = (sw.vector.to(torch.float64) / scale).to(torch.float32)
    balanced = torch.sqrt(s.double().norm() / vocab**0.5).clamp_min(1e-30)
    k = float(2.0 ** torch.round(torch.log2(balanced)))
    a = torch.zeros(rank, vocab, dtype=torch.float32)
    b = torch.zeros(hidden, rank, dtype=torch.float32)
    a[0] = k
    b[:, 0] = s / k
    return {f"{KEY_PREFIX}{writer}.lora_embedding_A": a, f"{KEY_PREFIX}{writer}.lora_embedding_B": b}


def writer_factors(loaded: LoadedModel, steered: list[SiteWeights]) -> Factors:
    """Per writer module of the fitted (non-embedding) sites: the balanced rank-1 factors, float64.

    ``A = k·b`` [1, in] and ``B = s/k`` [out, 1] with ``‖A‖ = ‖B‖``; a site with several writers
    splits ``b`` among them.
    """
    factors: Factors = {}
    for sw in steered:
        if loaded.arch.site(sw.site).embedding:
            continue
        writers = loaded.arch.writers(sw.site, sw.layer)
        widths = [loaded.in_features(w) for w in writers]
        b = sw.direction.to(torch.float64)
        s = sw.vector.to(torch.float64)
        k = torch.sqrt(s.norm() / b.norm().clamp_min(1e-30))
        for writer, part in zip(writers, torch.split(b, widths)):
            factors[writer] = ((part * k)[None], (s / k)[:, None])
    return factors


def balanced(factors: Factors) -> Factors:
    """Each rank component rescaled so ``‖A_i‖ = ‖B_i‖`` (B·A unchanged), for the bf16/fp16 range."""
    out = {}
    for w, (a, b) in factors.items():
        a, b = a.double().clone(), b.double().clone()
        for i in range(a.shape[0]):
            na, nb = a[i].norm(), b[:, i].norm()
            if na > 0 and nb > 0:
                k = torch.sqrt(nb / na)
                a[i] *= k
                b[:, i] /= k
        out[w] = (a, b)
    return out


def adapter_tensors(
    loaded: LoadedModel,
    steered: list[SiteWeights],
    target: TargetProfile = PROFILES[DEFAULT_TARGET],
    dtype: str | None = None,
    factors: Factors | None = None,
) -> dict[str, torch.Tensor]:
    """``lora_A`` / ``lora_B`` of every targeted writer module, shaped for ``target``.

    Every layer of a targeted module when the target needs it, else only the steered ones;
    the factors' rank (``writer_factors``: 1; a refined adapter's may be more), zero-padded to
    ``target.rank_for``; saved in ``dtype`` (default: the target's). ``factors`` (module →
    ``(A [r, in], B [out, r])``) replaces the closed form's, e.g. after ``refine``, and may hold
    modules other than the writers (the value route's value projection).
    """
    dtype = dtype or target.default_dtype
    target.check_dtype(dtype)
    by_writer = writer_factors(loaded, steered) if factors is None else factors
    rank = target.rank_for(max([a.shape[0] for a, _ in by_writer.values()], default=1))
    tensors: dict[str, torch.Tensor] = {}
    for sw in [sw for sw in steered if loaded.arch.site(sw.site).embedding]:
        tensors.update(embedding_tensors(loaded, sw, rank))
    steered = [sw for sw in steered if not loaded.arch.site(sw.site).embedding]
    modules = {w for sw in steered for w in loaded.arch.writers(sw.site, sw.layer)} | set(by_writer)
    shorts = sorted({_short_name(m) for m in modules})
    layers = set(range(loaded.num_layers)) if target.every_layer else {sw.layer for sw in steered}
    for short in shorts:
        for writer in _targeted_modules(loaded, short, layers):
            in_features, out_features = writer_features(loaded.module(writer))
            a = torch.zeros(rank, in_features, dtype=torch.float32)
            bmat = torch.zeros(out_features, rank, dtype=torch.float32)
            if writer in by_writer:
                a_w, b_w = by_writer[writer]
                a[: a_w.shape[0]] = a_w.to(torch.float32)
                bmat[:, : b_w.shape[1]] = b_w.to(torch.float32)
            tensors[f"{KEY_PREFIX}{writer}.lora_A.weight"] = a
            tensors[f"{KEY_PREFIX}{writer}.lora_B.weight"] = bmat
    return {key: _cast(key, value, dtype) for key, value in tensors.items()}


def _cast(key: str, value: torch.Tensor, dtype: str) -> torch.Tensor:
    cast = value.to(DTYPES[dtype]).contiguous()
    if not bool(torch.isfinite(cast).all()):
        raise LoraCompileError(
            f"{key} overflows {dtype} (max |value| {float(value.abs().max()):.3g}): "
            "save with --dtype float32 or lower --coef"
        )
    return cast


def adapter_config(
    base_model: str,
    target_modules: list[str],
    target: TargetProfile = PROFILES[DEFAULT_TARGET],
    fan_in_fan_out: bool = False,
    rank: int = 1,
) -> dict:
    """A PEFT LoRA config of long-standing keys only, at the target's rank for ``rank`` with ``lora_alpha = r``.

    ``fan_in_fan_out``: the writers store weights as [in, out] (GPT-2's Conv1D; the architecture
    table says so). The tensors keep Linear orientation either way; the flag tells a merge to transpose.
    """
    rank = target.rank_for(rank)
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
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
        write_adapter_files(tmp, tensors, config, report, model_card)
    return Path(out_dir)


def write_adapter_files(
    directory: Path, tensors: dict[str, torch.Tensor], config: dict, report: dict, model_card: str
) -> None:
    """The adapter's files in an existing (temporary) directory."""
    save_file(dict(sorted(tensors.items())), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (directory / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (directory / "README.md").write_text(model_card)
