"""Refine pass: the closed-form LoRA improved by gradient descent on KL(true addition ‖ adapter).

The closed form (fit.py) makes ``b·x ≈ 1`` in the least-squares sense on the writer's inputs,
which weighs every token and every direction of the error alike. What a user sees is the
next-token distribution, so this pass starts from the closed-form factors and minimises the
mean per-token KL(true addition ‖ adapter) over calibration tokens with Adam on the PEFT LoRA
parameters (the base model frozen). The targets are the true-addition log-probabilities
(``verify.true_addition``), computed once per batch and kept. A split of the *calibration* text
(never the held-out text results are reported on) decides early stopping, and the best factors
seen on it are kept, the closed form included: refinement is never worse than the closed form
on that split.

Cost: KL needs logits, so each step runs the model from the first steered layer to the output
(and back, for the gradient): the layers below it run once per batch, their output cached
(where the architecture takes ``inputs_embeds`` as the residual stream, ``embeds_are_stream``).
Deterministic: a fixed seed orders the batches and initialises any random factor; the same
inputs on the same machine and thread count give byte-identical factors.

``train_lora`` also trains from PEFT's standard init (A kaiming-uniform, B = 0) on the same
tokens and step budget: the comparison with what a user would otherwise do.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .calibrate import StopForward, encode, padded_batches, run_until_stopped
from .corpus import Sample
from .emit import Factors
from .errors import LoraCompileError
from .models import LoadedModel
from .progress import track
from .vectors import SteeringVector
from .verify import VERIFY_MAX_TOKENS, token_kl, true_addition

INITS = ("closed_form", "standard")


@dataclass(frozen=True)
class RefineOptions:
    """The refinement's budget and optimiser; the defaults keep one site to minutes on 2 CPU cores."""

    steps: int = 48  # most optimiser steps
    batch_samples: int = 2  # sequences per step
    train_samples: int = 16  # calibration samples trained on
    val_samples: int = 8  # calibration samples held out for early stopping
    max_tokens: int = 128  # tokens per sample
    eval_every: int = 8  # steps between evaluations on the validation split
    patience: int = 2  # evaluations without improvement before stopping
    # Adam's learning rate. None: ``lr_scale`` × the RMS of each initial tensor for the closed form (a
    # step moves each factor's entries by about that fraction of their size), 1e-3 for the standard
    # init (B starts at zero: no scale to take).
    lr: float | None = None
    lr_scale: float = 0.003  # 0.02 overshot at resid_mid 10 (README "Refinement")
    rank: int = 1  # extra rank beyond the closed form's 1 starts as A random, B = 0 (adds nothing)
    # With the next-layer route: LoRAs on layer L+1's query/key projections too (A random, B = 0), so
    # the adapter can follow how the vector moves that layer's attention pattern, token by token, which
    # a vector added at resid_mid L+1 cannot (resid_post 10: held-out KL ratio 0.00536 without, 0.00512
    # with, at 48 steps; README "The next-layer route into resid_post").
    pattern: bool = True
    seed: int = 0
    # A closed form whose validation KL ratio is already at or below this is kept without a step:
    # on the embedded model no step improved on one this close (resid_mid with the value route:
    # 0 improving steps of 16 at every layer), and each try cost 1-2 minutes on 2 cores.
    # None: always refine.
    settled_below: float | None = 1e-3
    # Stop (after an evaluation) once this many seconds have passed: a wall-clock budget for
    # comparisons (scripts/bench.py); None, as compile uses it: the steps alone, deterministic.
    max_seconds: float | None = None

    @classmethod
    def with_samples(cls, train_samples: int, **options) -> RefineOptions:
        """``train_samples`` trained on and a quarter as many (at least ``val_samples``' default) held
        back to stop on: the split ``compile --refine-samples`` uses."""
        return cls(train_samples=train_samples, val_samples=max(cls.val_samples, train_samples // 4), **options)

    def check(self) -> None:
        for name in ("steps", "batch_samples", "train_samples", "val_samples", "max_tokens", "eval_every", "rank"):
            if getattr(self, name) < 1:
                raise LoraCompileError(f"refinement {name} must be at least 1, got {getattr(self, name)}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise LoraCompileError(f"refinement time budget must be positive, got {self.max_seconds}")
        if self.settled_below is not None and not (math.isfinite(self.settled_below) and self.settled_below >= 0):
            raise LoraCompileError(f"refinement's settled ratio must be a number ≥ 0, got {self.settled_below}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise LoraCompileError(f"refinement learning rate must be a positive number, got {self.lr}")


@dataclass
class TrainResult:
    """What a run of ``train_lora`` found: the best factors on the validation split, and how it went."""

    factors: Factors  # best on the validation split (step 0: the initial factors)
    init: str
    kl_ratio_initial: float  # validation KL(true‖adapter) / KL(true‖unsteered) at step 0
    kl_ratio_best: float
    best_step: int
    steps: int  # steps run (early stopping may end before the budget)
    seconds: float
    train_tokens: int
    val_tokens: int
    history: list[dict] = field(default_factory=list)  # per evaluation: step, seconds, kl_ratio
    settled: bool = False  # the closed form was already at or below ``settled_below``: no step taken

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["factors"]
        return d

    def seconds_to_reach(self, kl_ratio: float) -> float | None:
        """Seconds (from the start, preparation included) until validation reached ``kl_ratio``; None if never."""
        for h in self.history:
            if h["kl_ratio"] <= kl_ratio:
                return h["seconds"]
        return None

    def steps_to_reach(self, kl_ratio: float) -> int | None:
        for h in self.history:
            if h["kl_ratio"] <= kl_ratio:
                return h["step"]
        return None


def split_samples(samples: list[Sample], options: RefineOptions) -> tuple[list[Sample], list[Sample]]:
    """(train, validation) samples of the calibration text: a seeded shuffle, so both span its domains."""
    usable = [s for s in samples if s.text or s.messages]
    if len(usable) < 2:
        raise LoraCompileError(
            "refinement needs at least 2 calibration samples (one to train on, one to stop on): pass more --texts"
        )
    order = torch.randperm(len(usable), generator=torch.Generator().manual_seed(options.seed)).tolist()
    n_val = min(options.val_samples, max(1, len(usable) // 3))
    val = [usable[i] for i in order[:n_val]]
    train = [usable[i] for i in order[n_val : n_val + options.train_samples]]
    return train, val


@contextmanager
def _layers_from(loaded: LoadedModel, first: int) -> Iterator[None]:
    """The model's decoder stack cut to layers ``first..``: fed the input of layer ``first`` as ``inputs_embeds``."""
    parent_path, _, name = loaded.arch.layers.rpartition(".")
    parent = loaded.module(parent_path)
    full = getattr(parent, name)
    setattr(parent, name, nn.ModuleList(list(full)[first:]))
    try:
        yield
    finally:
        setattr(parent, name, full)


@dataclass
class _Batch:
    inputs: torch.Tensor  # input of layer ``first`` [B, T, d] (or token ids [B, T] when layers are not skipped)
    mask: torch.Tensor  # [B, T] long
    samples: list[int]  # indices of the batch's samples
    target: torch.Tensor | None = None  # true-addition logits at the batch's tokens [n, V]


class _Runner:
    """Runs the model from the first steered layer (cached inputs below it) to the logits."""

    def __init__(self, loaded: LoadedModel, first: int):
        self.loaded = loaded
        self.first = first if loaded.arch.embeds_are_stream else 0
        self.skip = loaded.arch.embeds_are_stream

    def prepare(self, token_lists: list[list[int]], batch_samples: int, max_tokens: int) -> list[_Batch]:
        loaded = self.loaded
        out = []
        for batch, ids, mask in padded_batches(token_lists, loaded.tokenizer.pad_token_id, batch_samples * max_tokens):
            out.append(self.batch(batch, ids, mask))
        return out

    def batch(self, indices: list[int], ids: torch.Tensor, mask: torch.Tensor) -> _Batch:
        """One batch on the model's device: the stream entering layer ``first`` where it can be cached."""
        ids, mask = ids.to(self.loaded.device), mask.to(self.loaded.device)
        return _Batch(self._stream(ids, mask) if self.skip else ids, mask, indices)

    def _stream(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The residual stream entering layer ``first`` (unsteered: steering starts at or after it)."""
        seen = {}

        def keep(_module, args, kwargs):
            seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach()
            raise StopForward

        layer = self.loaded.module(self.loaded.arch.layer_module(self.first))
        handle = layer.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            with torch.no_grad():
                run_until_stopped(self.loaded, ids, mask)
        finally:
            handle.remove()
        return seen["x"]

    def logits(self, batch: _Batch) -> torch.Tensor:
        """Logits at the batch's (unpadded) tokens, [n, V]."""
        model = self.loaded.model
        if self.skip:
            with _layers_from(self.loaded, self.first):
                out = model(inputs_embeds=batch.inputs, attention_mask=batch.mask, use_cache=False).logits
        else:
            out = model(input_ids=batch.inputs, attention_mask=batch.mask, use_cache=False).logits
        return out[batch.mask.bool()]


@contextmanager
def _lora(loaded: LoadedModel, writers: list[str], rank: int) -> Iterator[dict[str, tuple[nn.Parameter, nn.Parameter]]]:
    """PEFT LoRA layers (rank ``rank``, scale 1, no dropout) on ``writers``; the base model frozen, restored on exit."""
    from peft import LoraConfig, get_peft_model

    flags = {name: p.requires_grad for name, p in loaded.model.named_parameters()}
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(writers), lora_dropout=0.0)
    with torch.random.fork_rng(devices=[]):  # PEFT's own init draws from the global generator: leave it as it was
        peft_model = get_peft_model(loaded.model, config)
    peft_model.eval()
    try:
        params = {}
        for w in writers:
            layer = loaded.module(w)
            params[w] = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
        yield params
    finally:
        peft_model.unload()
        for name, p in loaded.model.named_parameters():
            p.requires_grad_(flags.get(name, False))


def _set(params: dict[str, tuple[nn.Parameter, nn.Parameter]], factors: Factors | None) -> None:
    """Put ``factors`` (zero-padded to the layers' rank) into the LoRA layers; None, or a module the
    factors do not name: zeros (the base model)."""
    with torch.no_grad():
        for w, (a, b) in params.items():
            a.zero_()
            b.zero_()
            if factors is not None and w in factors:
                fa, fb = factors[w]
                a[: fa.shape[0]] = fa.to(a.dtype)
                b[:, : fb.shape[1]] = fb.to(b.dtype)


def _standard_init(loaded: LoadedModel, writers: list[str], rank: int, generator: torch.Generator) -> Factors:
    """PEFT's default LoRA init: A kaiming-uniform (a = √5, as ``nn.Linear``), B = 0."""
    factors = {}
    for w in writers:
        module = loaded.module(w)
        a = torch.empty(rank, module.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        factors[w] = (a, torch.zeros(module.out_features, rank))
    return factors


def _widen(loaded: LoadedModel, factors: Factors, rank: int, generator: torch.Generator) -> Factors:
    """Factors of rank ≥ ``rank``: extra components start with A random, B = 0, so B·A is unchanged."""
    extra = _standard_init(loaded, list(factors), rank, generator)
    out = {}
    for w, (a, b) in factors.items():
        have = a.shape[0]
        if have >= rank:
            out[w] = (a.float(), b.float())
        else:
            out[w] = (torch.cat([a.float(), extra[w][0][have:]]), torch.cat([b.float(), extra[w][1][:, have:]], 1))
    return out


def train_lora(
    loaded: LoadedModel,
    vector: SteeringVector,
    samples: list[Sample],
    *,
    coef: float = 1.0,
    init: str = "closed_form",
    factors: Factors | None = None,
    options: RefineOptions = RefineOptions(),
    description: str | None = None,
    extra_modules: tuple[str, ...] = (),
) -> TrainResult:
    """Fit LoRA factors on the writers of ``vector``'s site to minimise KL(true addition of coef·vector ‖ adapter).

    ``samples``: calibration text, split by ``split_samples`` into training and validation parts.
    ``init="closed_form"`` starts from ``factors`` (``emit.writer_factors`` of the compiled
    directions, with the value route's factors where compile kept it); ``init="standard"`` from
    PEFT's default init (on the writers; ``factors`` unused). ``extra_modules``: further modules
    trained from PEFT's default init (B = 0: they add nothing at step 0). Returns the factors best on
    validation (step 0 included) with the run's history.
    """
    options.check()
    if init not in INITS:
        raise LoraCompileError(f"unknown init {init!r}: use one of {', '.join(INITS)}")
    if init == "closed_form" and factors is None:
        raise LoraCompileError("init='closed_form' needs the closed-form factors (emit.writer_factors)")
    start = time.perf_counter()
    writers = [w for layer in vector.layers for w in loaded.arch.writers(vector.site, layer)]
    if init == "closed_form":
        writers = sorted(factors)  # the writers, and the value projections where the value route was kept
    generator = torch.Generator().manual_seed(options.seed)
    if init == "standard":
        initial = _standard_init(loaded, writers, options.rank, generator)
    else:
        initial = _widen(loaded, {w: factors[w] for w in writers}, options.rank, generator)
    extra = [m for m in extra_modules if m not in initial]
    initial |= _standard_init(loaded, extra, options.rank, generator)
    writers = list(initial)
    rank = max(a.shape[0] for a, _ in initial.values())

    train, val = split_samples(samples, options)
    runner = _Runner(loaded, min(vector.layers))
    train_batches = runner.prepare(encode(loaded, train, options.max_tokens), options.batch_samples, options.max_tokens)
    val_batches = runner.prepare(encode(loaded, val, options.max_tokens), options.batch_samples, options.max_tokens)
    kl_unsteered = 0.0
    with _lora(loaded, writers, rank) as params:

        def add_targets(batches: list[_Batch]) -> None:
            """Each batch's true-addition logits; leaves the LoRA layers adding nothing."""
            _set(params, None)
            with torch.no_grad():
                for batch in batches:
                    with true_addition(loaded, vector, coef):
                        batch.target = runner.logits(batch)

        add_targets(val_batches)
        with torch.no_grad():
            for batch in val_batches:
                kl_unsteered += float(token_kl(batch.target, runner.logits(batch)).sum())
        val_tokens = sum(int(b.mask.sum()) for b in val_batches)
        kl_unsteered = max(kl_unsteered / val_tokens, 1e-30)

        def evaluate() -> float:
            with torch.no_grad():
                total = sum(float(token_kl(b.target, runner.logits(b)).sum()) for b in val_batches)
            return total / val_tokens / kl_unsteered

        _set(params, initial)
        lrs = {}
        for w, (a, b) in params.items():
            for p, init_value in ((a, initial[w][0]), (b, initial[w][1])):
                scale = float(init_value.pow(2).mean().sqrt())
                if options.lr is not None:
                    lrs[p] = options.lr
                elif init == "closed_form" and scale > 0:
                    lrs[p] = options.lr_scale * scale
                else:
                    lrs[p] = 1e-3
        optimiser = torch.optim.Adam([{"params": [p], "lr": lr} for p, lr in lrs.items()])

        def snapshot() -> Factors:
            return {w: (a.detach().clone(), b.detach().clone()) for w, (a, b) in params.items()}

        ratio0 = evaluate()
        history = [{"step": 0, "seconds": time.perf_counter() - start, "kl_ratio": ratio0}]
        best_ratio, best_step, best = ratio0, 0, snapshot()
        order: list[int] = []
        stale, step = 0, 0
        settled = init == "closed_form" and options.settled_below is not None and ratio0 <= options.settled_below
        budget = 0 if settled else options.steps
        if budget:  # the training tokens' targets only where there is training to do
            add_targets(train_batches)
            _set(params, initial)
        label = description or ("refining" if init == "closed_form" else "training from standard init")
        for step in track(range(1, budget + 1), label, total=budget):
            if not order:
                order = torch.randperm(len(train_batches), generator=generator).tolist()
            batch = train_batches[order.pop()]
            optimiser.zero_grad(set_to_none=True)
            loss = token_kl(batch.target, runner.logits(batch), torch.float32).mean()
            loss.backward()
            optimiser.step()
            out_of_time = options.max_seconds is not None and time.perf_counter() - start > options.max_seconds
            if step % options.eval_every and step != options.steps and not out_of_time:
                continue
            ratio = evaluate()
            history.append({"step": step, "seconds": time.perf_counter() - start, "kl_ratio": ratio})
            if ratio < best_ratio:
                best_ratio, best_step, best, stale = ratio, step, snapshot(), 0
            else:
                stale += 1
            if stale >= options.patience or out_of_time:
                break
    return TrainResult(
        factors=best,
        init=init,
        kl_ratio_initial=ratio0,
        kl_ratio_best=best_ratio,
        best_step=best_step,
        steps=step,
        seconds=time.perf_counter() - start,
        train_tokens=sum(int(b.mask.sum()) for b in train_batches),
        val_tokens=val_tokens,
        history=history,
        settled=settled,
    )


def heldout_kl(
    loaded: LoadedModel,
    vector: SteeringVector,
    samples: list[Sample],
    adapters: dict[str, Factors],
    *,
    coef: float = 1.0,
    max_tokens: int = VERIFY_MAX_TOKENS,
    batch_tokens: int = 2048,
) -> dict:
    """KL(true‖adapter)/KL(true‖unsteered) of each named set of factors on ``samples``, overall and per domain.

    Returns ``{"kl_unsteered", "tokens", "adapters": {name: {"kl_ratio", "kl", "per_domain"}}}``.

    The same PEFT LoRA layers as ``train_lora`` (scale 1, float32), one reference run per batch
    shared by every adapter; tokens and domains as ``verify`` counts them. LoRA layers on the site's
    writers and on every other module the factors name (the value route's value projections).
    """
    writers = [w for layer in vector.layers for w in loaded.arch.writers(vector.site, layer)]
    writers += sorted({m for f in adapters.values() for m in f} - set(writers))
    rank = max(a.shape[0] for f in adapters.values() for a, _ in f.values())
    runner = _Runner(loaded, min(vector.layers))
    token_lists = encode(loaded, samples, max_tokens)
    kl_u: list[torch.Tensor] = []
    kl_a: dict[str, list[torch.Tensor]] = {name: [] for name in adapters}
    domains: list[str] = []
    with _lora(loaded, writers, rank) as params, torch.no_grad():
        for ids_batch, ids, mask in track(
            list(padded_batches(token_lists, loaded.tokenizer.pad_token_id, batch_tokens)), "held-out KL"
        ):
            batch = runner.batch(ids_batch, ids, mask)
            _set(params, None)
            plain = runner.logits(batch)
            with true_addition(loaded, vector, coef):
                target = runner.logits(batch)
            kl_u.append(token_kl(target, plain).cpu())
            for name, factors in adapters.items():
                _set(params, factors)
                kl_a[name].append(token_kl(target, runner.logits(batch)).cpu())
            for row, i in enumerate(ids_batch):
                domains += [samples[i].domain] * int(batch.mask[row].sum())
    unsteered = torch.cat(kl_u)
    labels = sorted(set(domains))
    index = torch.tensor([labels.index(d) for d in domains])
    out: dict = {"kl_unsteered": float(unsteered.mean()), "tokens": int(unsteered.numel()), "adapters": {}}
    for name in adapters:
        kl = torch.cat(kl_a[name])
        out["adapters"][name] = {
            "kl_ratio": float(kl.mean() / unsteered.mean().clamp_min(1e-30)),
            "kl": float(kl.mean()),
            "per_domain": {
                d: float(kl[index == k].mean() / unsteered[index == k].mean().clamp_min(1e-30))
                for k, d in enumerate(labels)
            },
        }
    return out
