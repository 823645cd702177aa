"""Verify pass: the PEFT-loaded adapter against true activation addition.

True addition adds ``coef·s`` to the output of the site's hook module (DESIGN §3)
with a forward hook; the compiled adapter is loaded with ``peft.PeftModel``, the
client servers mimic, cast as servers cast it (scaling folded into B, A and B in
the model's dtype). Both run on held-out prompts (not calibration text), in the
model's dtype: run a bfloat16 copy of the model to see what a bfloat16 server gives.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .calibrate import encode, padded_batches
from .corpus import Sample
from .errors import LoraCompileError
from .models import LoadedModel
from .progress import track
from .vectors import SteeringVector

VERIFY_MAX_TOKENS = 256
# Tokens × vocabulary of one batch's logits: 2048 tokens at SmolLM2's 49,152; fewer for larger
# vocabularies (Gemma's 262,144: 384 tokens), whose float64 KL temporaries would take gigabytes.
VERIFY_BATCH_LOGITS = 2048 * 49152
DEFAULT_MAX_KL_RATIO = 0.05


@contextmanager
def true_addition(loaded: LoadedModel, vector: SteeringVector, coef: float = 1.0) -> Iterator[None]:
    """Add ``coef·direction.L`` at the vector's site for every layer L, at every position."""
    handles = []

    def adder(delta: torch.Tensor):
        def hook(_module, _args, output):
            if isinstance(output, tuple):
                return (output[0] + delta.to(output[0].dtype),) + tuple(output[1:])
            return output + delta.to(output.dtype)

        return hook

    try:
        for layer, vec in vector.directions.items():
            path = loaded.arch.hook_module(vector.site, layer)
            handles.append(loaded.module(path).register_forward_hook(adder(coef * vec.to(loaded.device_of(path)))))
        yield
    finally:
        for h in handles:
            h.remove()


def _cast_as_served(peft_model: torch.nn.Module) -> None:
    """Fold each LoRA's scaling into B and cast A and B to the base layer's dtype, as vLLM does.

    (PEFT itself would keep float32 adapters on a bfloat16 base; servers do not.)
    """
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        dtype = module.get_base_layer().weight.dtype
        for name, scaling in module.scaling.items():
            if name in module.lora_A:
                a, b = module.lora_A[name].weight, module.lora_B[name].weight
            else:
                a, b = module.lora_embedding_A[name], module.lora_embedding_B[name]
            b.data = (b.data.double() * scaling).to(dtype)
            a.data = a.data.to(dtype)
            module.scaling[name] = 1.0


@contextmanager
def peft_adapter(loaded: LoadedModel, adapter_dir: str | Path) -> Iterator[torch.nn.Module]:
    """The base model with the adapter loaded by PEFT as servers use it; the base is restored on exit."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(loaded.model, str(adapter_dir), autocast_adapter_dtype=False)
    peft_model.eval()
    _cast_as_served(peft_model)
    try:
        yield peft_model
    finally:
        peft_model.unload()


def _has_lora(peft_model: torch.nn.Module, name: str) -> bool:
    return hasattr(peft_model.base_model.model.get_submodule(name), "lora_A")


def _value_routed(loaded: LoadedModel, peft_model: torch.nn.Module, vector: SteeringVector) -> dict:
    """Writer → (attention module, value projection) at the layers where the adapter has a value-route LoRA."""
    routed = {}
    for layer in vector.layers:
        try:
            attention, values = loaded.arch.attention_route(vector.site, layer)
        except LoraCompileError:  # not written by attention, or no separate value projection
            continue
        if _has_lora(peft_model, values):
            routed[loaded.arch.writers(vector.site, layer)[0]] = (attention, values)
    return routed


@contextmanager
def _lora_deltas(
    peft_model: torch.nn.Module,
    writers: list[str],
    norms: dict[str, str] | None = None,
    routed: dict[str, tuple[str, str]] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Capture what each steered writer's LoRA adds to the stream: output − base_layer(input).

    ``norms``: writer → the post-writer norm its output passes through (Gemma, OLMo 2): there the
    stream receives ``N(output) − N(output − lora)``, not the LoRA's own delta. ``routed``: writer →
    (attention module, value projection) where the adapter also has a LoRA on the value projection
    (the value route): what reaches the stream is the attention block's output with both LoRAs
    less its output with neither, so the block is run again without them.
    """
    deltas: dict[str, torch.Tensor] = {}
    handles = []
    norms = norms or {}
    routed = routed or {}
    base = peft_model.base_model.model
    rerunning = []

    def capture_block(name: str, loras: list[torch.nn.Module]):
        def hook(module, args, kwargs, output):
            if rerunning:
                return
            rerunning.append(name)
            try:
                for lora in loras:
                    lora.enable_adapters(False)
                plain = module(*args, **kwargs)
            finally:
                for lora in loras:
                    lora.enable_adapters(True)
                rerunning.pop()
            deltas[name] = (output[0] - plain[0]).detach()

        return hook

    def capture(name: str):
        norm = base.get_submodule(norms[name]) if name in norms else None

        def hook(module, args, output):
            lora = output - module.base_layer(args[0])
            if norm is not None:
                lora = norm(output) - norm(output - lora)
            deltas[name] = lora.detach()

        return hook

    try:
        for w in writers:
            if w in routed:
                attention, values = routed[w]
                loras = [base.get_submodule(values), base.get_submodule(w)]
                block = base.get_submodule(attention)
                handles.append(block.register_forward_hook(capture_block(w, loras), with_kwargs=True))
            else:
                handles.append(base.get_submodule(w).register_forward_hook(capture(w)))
        yield deltas
    finally:
        for h in handles:
            h.remove()


@dataclass
class VerifyReport:
    kl_compiled: float  # mean per token KL(true ‖ compiled)
    kl_unsteered: float  # mean per token KL(true ‖ unsteered)
    kl_ratio: float
    top1_agreement: float  # argmax(true) == argmax(compiled)
    # RMS over tokens of ‖Δ − coef·s‖ / ‖coef·s‖, positions ≥ 1; Δ: what the LoRA adds to the stream
    # (behind a post-writer norm: what reaches the stream through the norm). None: the adapter has
    # no LoRA on the site's writers (the next-layer route), nothing to compare.
    delta_rel_error: float | None
    delta_rel_error_first: float | None  # the same at position 0
    tokens: int
    dtype: str = "float32"  # what the base model, the adapter and the reference ran in
    # Below a float32 dtype, rounding alone makes two runs of the same steering differ (DESIGN §2's
    # bf16 concern): both sides are judged against true addition in float32 instead.
    kl_dtype_floor: float | None = None  # KL(true, float32 ‖ true, dtype): what the dtype itself loses
    kl_compiled_vs_float32: float | None = None  # KL(true, float32 ‖ compiled, dtype)
    # Paired per token: mean of KL(true fp32 ‖ compiled) − KL(true fp32 ‖ true in dtype), over kl_unsteered,
    # with its standard error (prompts as clusters: a prompt's tokens share their rounding history).
    kl_excess_ratio: float | None = None
    kl_excess_ratio_se: float | None = None
    prompts: int = 0
    per_domain: dict[str, dict[str, float]] = field(default_factory=dict)
    generations: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def token_kl(target: torch.Tensor, logits: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per-token KL(softmax(target) ‖ softmax(logits)), both logits, computed in ``dtype``.

    Measurements take float64: a KL of 1e-6 is a difference of two entropies of ~5, which
    float32 rounds by ~1e-6. Training (``refine``) takes float32: its gradient ``q − p`` is
    accurate there.
    """
    logp = F.log_softmax(target.to(dtype), -1)
    logq = F.log_softmax(logits.to(dtype), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def paired_mean(diff: torch.Tensor, cluster: torch.Tensor) -> tuple[float, float]:
    """Mean of per-token differences and its cluster-robust standard error (clusters: prompts).

    Tokens of one prompt are not independent (they share the prompt's rounding errors upstream),
    so the error of the mean is estimated from per-prompt sums: the ratio estimator's variance
    ``k/(k−1) · Σ_i (S_i − m·n_i)² / N²`` over k prompts with sums S_i of n_i tokens, N = Σ n_i.
    """
    diff = diff.double()
    labels, index = torch.unique(cluster, return_inverse=True)
    k = len(labels)
    sums = torch.zeros(k, dtype=torch.float64).index_add_(0, index, diff)
    counts = torch.zeros(k, dtype=torch.float64).index_add_(0, index, torch.ones_like(diff))
    mean = float(sums.sum() / counts.sum())
    if k < 2:
        return mean, float("inf")
    var = k / (k - 1) * float(((sums - mean * counts) ** 2).sum()) / float(counts.sum()) ** 2
    return mean, var**0.5


def greedy(model: torch.nn.Module, loaded: LoadedModel, ids: list[int], max_new_tokens: int) -> list[int]:
    """``model``'s greedy continuation of ``ids`` (the new token ids only)."""
    inp = torch.tensor([ids], device=loaded.device)
    with torch.no_grad():
        out = model.generate(
            input_ids=inp,
            attention_mask=torch.ones_like(inp),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
    return out[0, len(ids) :].tolist()


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def verify(
    loaded: LoadedModel,
    adapter_dir: str | Path,
    vector: SteeringVector,
    prompts: list[Sample],
    coef: float = 1.0,
    generation_prompts: list[Sample] | None = None,
    max_new_tokens: int = 32,
    float32_model: LoadedModel | None = None,
) -> VerifyReport:
    """Compare the adapter with true addition of ``coef·vector`` on ``prompts``.

    ``float32_model``: the same model in float32, given when ``loaded`` runs in a lower
    precision, to separate the adapter's error from the dtype's own rounding.
    """
    token_lists = encode(loaded, prompts, VERIFY_MAX_TOKENS)
    pad = loaded.tokenizer.pad_token_id
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    batches = list(padded_batches(token_lists, pad, max(1, VERIFY_BATCH_LOGITS // vocab)))
    reference: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    kl_floor, token_prompt = [], []
    with torch.no_grad():
        for batch, ids, mask in track(batches, "reference runs"):
            ids, mask = ids.to(loaded.device), mask.to(loaded.device)
            plain = loaded.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            with true_addition(loaded, vector, coef):
                steered = loaded.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            exact = None
            if float32_model is not None:
                with true_addition(float32_model, vector, coef):
                    exact = float32_model.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                kl_floor.append(token_kl(exact, steered)[mask.bool()].cpu())
                token_prompt.append(torch.tensor(batch)[:, None].expand_as(mask)[mask.bool().cpu()])
            reference.append((plain, steered, exact))
    writers = [w for layer in vector.layers for w in loaded.arch.writers(vector.site, layer)]
    norms = {
        w: loaded.arch.post_norm(vector.site, layer)
        for layer in vector.layers
        for w in loaded.arch.writers(vector.site, layer)
        if loaded.arch.post_norm(vector.site, layer) is not None
    }
    kl_c, kl_u, kl_c32, top1, rel, rel_first, domains = [], [], [], [], [], [], []
    gens: list[dict] = []
    with peft_adapter(loaded, adapter_dir) as peft_model, torch.no_grad():
        routed = _value_routed(loaded, peft_model, vector)
        # The delta is compared with the vector only at the site's writers; an adapter with no LoRA
        # there (the next-layer route: its LoRAs write layer L+1) is judged by its KL alone.
        writers = [w for w in writers if _has_lora(peft_model, w)]
        for (batch, ids, mask), (plain, steered, exact) in zip(track(batches, "adapter runs"), reference):
            ids, mask = ids.to(loaded.device), mask.to(loaded.device)
            with _lora_deltas(peft_model, writers, norms, routed) as deltas:
                compiled = peft_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            m = mask.bool()
            if exact is not None:
                kl_c32.append(token_kl(exact, compiled)[m].cpu())
            kl_c.append(token_kl(steered, compiled)[m].cpu())
            kl_u.append(token_kl(steered, plain)[m].cpu())
            top1.append((steered.argmax(-1) == compiled.argmax(-1))[m].cpu())
            for row, i in enumerate(batch):
                domains += [prompts[i].domain] * int(m[row].sum())
            position = torch.arange(m.shape[1], device=m.device).expand_as(m)
            for layer in vector.layers:
                if not any(w in deltas for w in loaded.arch.writers(vector.site, layer)):
                    continue
                # [B, T, d] (OPT's MLP writers see the tokens flattened to [B·T, d]), on the layer's device
                added = sum(deltas[w].double().reshape(*m.shape, -1) for w in loaded.arch.writers(vector.site, layer))
                target = (coef * vector.directions[layer]).to(added.device, torch.float64)
                err = ((added - target).norm(dim=-1) / target.norm()).to(m.device)
                rel.append(err[m & (position > 0)].cpu())
                rel_first.append(err[m & (position == 0)].cpu())
        for sample in track(generation_prompts or [], "greedy generations"):
            ids = sample.token_ids(loaded.tokenizer, VERIFY_MAX_TOKENS, add_generation_prompt=True)
            compiled_gen = greedy(peft_model, loaded, ids, max_new_tokens)
            with peft_model.disable_adapter():
                with true_addition(loaded, vector, coef):
                    true_gen = greedy(peft_model, loaded, ids, max_new_tokens)
                plain_gen = greedy(peft_model, loaded, ids, max_new_tokens)
            decode = loaded.tokenizer.decode
            gens.append(
                {
                    "prompt": sample.messages[-1][1] if sample.messages else sample.text,
                    "true": decode(true_gen, skip_special_tokens=True),
                    "compiled": decode(compiled_gen, skip_special_tokens=True),
                    "unsteered": decode(plain_gen, skip_special_tokens=True),
                    "tokens_agreeing": agreement(true_gen, compiled_gen),
                    "tokens": len(true_gen),
                }
            )
    kl_c_all, kl_u_all, top1_all = torch.cat(kl_c), torch.cat(kl_u), torch.cat(top1)
    rms = lambda t: float(t.pow(2).mean().sqrt()) if t.numel() else float("nan")  # noqa: E731
    per_domain = {}
    labels = sorted(set(domains))
    index = torch.tensor([labels.index(d) for d in domains])
    for k, d in enumerate(labels):
        sel = index == k
        per_domain[d] = {
            "kl_compiled": float(kl_c_all[sel].mean()),
            "kl_unsteered": float(kl_u_all[sel].mean()),
            "kl_ratio": float(kl_c_all[sel].mean() / kl_u_all[sel].mean().clamp_min(1e-30)),
            "top1_agreement": float(top1_all[sel].float().mean()),
            "tokens": int(sel.sum()),
        }
    floor_fields = {}
    if kl_floor:
        floor_all, vs32_all = torch.cat(kl_floor), torch.cat(kl_c32)
        excess, excess_se = paired_mean(vs32_all - floor_all, torch.cat(token_prompt))
        unsteered = max(float(kl_u_all.mean()), 1e-30)
        floor_fields = {
            "kl_dtype_floor": float(floor_all.mean()),
            "kl_compiled_vs_float32": float(vs32_all.mean()),
            "kl_excess_ratio": excess / unsteered,
            "kl_excess_ratio_se": excess_se / unsteered,
        }
    return VerifyReport(
        **floor_fields,
        kl_compiled=float(kl_c_all.mean()),
        kl_unsteered=float(kl_u_all.mean()),
        kl_ratio=float(kl_c_all.mean() / kl_u_all.mean().clamp_min(1e-30)),
        top1_agreement=float(top1_all.float().mean()),
        delta_rel_error=rms(torch.cat(rel)) if rel else None,
        delta_rel_error_first=rms(torch.cat(rel_first)) if rel else None,
        tokens=int(kl_c_all.numel()),
        prompts=len(prompts),
        dtype=str(loaded.dtype).removeprefix("torch."),
        per_domain=per_domain,
        generations=gens,
    )
