"""Calibration pass: streaming moments of writer-module inputs.

For each site (site name, layer) the inputs of its writer modules (concatenated,
for architectures with several writers per site) are reduced to
``G = Σ x xᵀ``, ``μ = Σ x`` and a token count, in float64, batch by batch.
Activations are never stored, padding is excluded, and the forward pass stops
after the deepest layer needed. Moments are additive: shards combine with ``+``.

The same streaming machinery projects held-out inputs onto fitted directions
(``project_inputs``), which is how fit errors are measured.

Several layers are calibrated in layer order (``calibrate_sequential``), each under
the compiled deltas of the earlier ones (``compiled_deltas``): steering an early
layer moves the inputs of every later writer, as in sequential post-training
quantisation.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from . import distributed
from .corpus import Sample
from .errors import LoraCompileError
from .models import LoadedModel
from .progress import track

SiteKey = tuple[str, int]  # (site, layer)

MAX_SAMPLE_TOKENS = 512
BATCH_TOKENS = 4096


class StopForward(Exception):
    """Raised by a hook after the deepest layer needed, so the rest of the model never runs."""


def run_until_stopped(loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """The model on one batch, until a hook raises ``StopForward`` (or to the end, if none does)."""
    try:
        loaded.model(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device), use_cache=False)
    except StopForward:
        pass


def _batch_gram(x: torch.Tensor) -> torch.Tensor:
    """``xᵀx`` of one batch on a GPU, in float32.

    Not float64: consumer GPUs run it at 1/32–1/64 of float32. float32 loses nothing that
    matters: bfloat16 or float16 activations (8 or 11 significant bits) multiply exactly in
    float32 (24 bits), so only the sum over one batch's ≤ 4096 tokens rounds, and batches add
    in float64. Such activations go to the tensor cores as they are, with float32 accumulation
    (``mm(out_dtype=float32)``): on an H100, for a 3239 × 14336 ``down_proj`` batch, 1.85 ms
    against 25.7 ms for a float32 product, with relative error 5.5e-6 against float64 (float32:
    5.6e-7), far below the activations' own rounding (2⁻⁹; scripts/measure_gpu.py). Float32
    activations take a float32 product; TF32 (inputs rounded to 10 bits) is off for it unless
    the user turned it on (``torch.backends.cuda.matmul``).
    """
    if x.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(x.T, x, out_dtype=torch.float32)
        except TypeError:  # torch < 2.8: no out_dtype
            pass
    x = x.to(torch.float32)
    return x.T @ x


@dataclass
class Moments:
    """Sufficient statistics of one site's writer inputs for the ridge fit."""

    gram: torch.Tensor  # [d, d] float64, Σ x xᵀ
    total: torch.Tensor  # [d] float64, Σ x
    count: int
    pinned: torch.Tensor  # [k, d] float64, inputs at the fixed prefix positions
    # The part of these moments from odd-numbered samples: a second fold, so the fit can
    # choose its ridge penalty by cross-validation on calibration data alone.
    fold: Moments | None = None

    @classmethod
    def zeros(cls, dim: int, device: torch.device | str = "cpu") -> Moments:
        return cls(
            gram=torch.zeros(dim, dim, dtype=torch.float64, device=device),
            total=torch.zeros(dim, dtype=torch.float64, device=device),
            count=0,
            pinned=torch.zeros(0, dim, dtype=torch.float64, device=device),
        )

    @property
    def dim(self) -> int:
        return self.total.numel()

    def add_(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``x`` [n, d], accumulated on ``x``'s device.

        On the CPU the batch product is float64, as the sums are (float64 costs the CPU only
        2× float32, and keeps the numbers the suite's bounds were measured with). On a GPU it
        is a float32 product, added per batch into the float64 accumulator (``_batch_gram``).
        """
        add_gram_(self.gram, x)
        self.total += x.sum(0, dtype=torch.float64)
        self.count += x.shape[0]

    def to(self, device: torch.device | str) -> Moments:
        """These moments (and their fold) on ``device``."""
        fold = self.fold.to(device) if self.fold is not None else None
        return Moments(self.gram.to(device), self.total.to(device), self.count, self.pinned.to(device), fold)

    def add_moments_(self, other: Moments) -> None:
        """In place ``self += other`` (gram, total, count): no third d×d matrix at the peak."""
        self.gram += other.gram
        self.total += other.total
        self.count += other.count

    def __add__(self, other: Moments) -> Moments:
        pinned = self.pinned if self.pinned.numel() else other.pinned
        fold = self.fold + other.fold if self.fold is not None and other.fold is not None else None
        return Moments(self.gram + other.gram, self.total + other.total, self.count + other.count, pinned, fold)

    def __sub__(self, other: Moments) -> Moments:
        return Moments(self.gram - other.gram, self.total - other.total, self.count - other.count, self.pinned)


@dataclass
class Calibration:
    """Moments per site, plus what they were measured on."""

    model_id: str
    moments: dict[SiteKey, Moments]
    tokens: int = 0
    domains: dict[str, int] = field(default_factory=dict)  # tokens per domain
    fixed_prefix: list[int] = field(default_factory=list)

    def to(self, device: torch.device | str) -> Calibration:
        """These moments on ``device`` (e.g. finished moments moved off the GPU)."""
        moments = {k: m.to(device) for k, m in self.moments.items()}
        return Calibration(self.model_id, moments, self.tokens, dict(self.domains), list(self.fixed_prefix))

    def __add__(self, other: Calibration) -> Calibration:
        domains = dict(self.domains)
        for d, n in other.domains.items():
            domains[d] = domains.get(d, 0) + n
        keys = self.moments.keys() & other.moments.keys()
        return Calibration(
            self.model_id,
            {k: self.moments[k] + other.moments[k] for k in sorted(keys)},
            self.tokens + other.tokens,
            domains,
            self.fixed_prefix or other.fixed_prefix,
        )


# Fixed point: a site's Gram entry G_ij is summed as an integer count of 2^(e_i + e_j − 62).
FIXED_POINT_BITS = 62
# The probe (batch 0) sets e_i; a dimension's mean square over all the text may be 2^(2·8) = 65536
# times its mean square in the probe before its sums leave the int64 range (checked: check_range).
MARGIN_BITS = 8
# A dimension (nearly) silent in the probe gets the range of one at this share of the loudest.
SILENT_FLOOR = 2.0**-30
ROW_CHUNK = 1024  # rows converted at a time: the float64 and int64 temporaries stay small


@dataclass
class FixedPointScale:
    """The grid of one site's integer moment sums, fixed from a probe every process computes.

    Why integers: float64 sums added in another order (1 process, N ranks, N shard files) round
    differently, and the fit can carry a last-bit difference into the float32 adapter. Each batch's
    float64 Gram (deterministic: batches are fixed by the text) is rounded once onto the grid; from
    there on sums are exact, so they are the same in any order and any split.

    ``G_ij`` counts ``2^(e_i + e_j − 62)``, ``μ_i`` counts ``2^(e_i + c − 62)``. With
    ``2^(2 e_i) ≥ tokens · mean square_i · 2^(2·MARGIN_BITS)`` and ``2^c ≥ √tokens``, Cauchy–Schwarz
    keeps ``|G_ij| ≤ 2^(e_i + e_j)`` and ``|μ_i| ≤ 2^(e_i + c)``: every sum fits 62 bits, and the
    rounding (half a unit per batch) is ~2^-46 of ``G_ii``, far below float32 activations' 2^-24.
    """

    exponents: torch.Tensor  # [d] int64
    count_exponent: int

    @classmethod
    def from_probe(cls, x: torch.Tensor, total_tokens: int) -> FixedPointScale:
        """From the inputs ``x`` [n, d] of the probe batch and the calibration's token count."""
        mean_square = (x.to(torch.float64) ** 2).mean(0).cpu() if x.shape[0] else torch.ones(x.shape[1])
        top = float(mean_square.max())
        mean_square = mean_square.clamp_min(top * SILENT_FLOOR if top > 0 else 1.0)
        tokens = max(total_tokens, 1)
        exponents = torch.ceil(0.5 * torch.log2(mean_square * tokens)).to(torch.int64) + MARGIN_BITS
        return cls(exponents, math.ceil(0.5 * math.log2(tokens)) + 1)

    @classmethod
    def unit(cls, dim: int) -> FixedPointScale:
        return cls(torch.zeros(dim, dtype=torch.int64), 0)

    def _steps(self, device: torch.device) -> tuple[torch.Tensor, float]:
        """Per-dimension factors ``2^(31 − e_i)`` and the μ factor ``2^(31 − c)``: exact powers of two."""
        ones = torch.ones(self.exponents.shape, dtype=torch.float64)
        return torch.ldexp(ones, 31 - self.exponents).to(device), 2.0 ** (31 - self.count_exponent)

    def add_gram_(self, accs: list[torch.Tensor], gram: torch.Tensor) -> None:
        """``acc += gram`` on the grid for each of ``accs`` (``gram`` of any float dtype), rounded once."""
        steps, _ = self._steps(accs[0].device)
        for r in range(0, gram.shape[0], ROW_CHUNK):
            g = gram[r : r + ROW_CHUNK].to(torch.float64) * steps[r : r + ROW_CHUNK, None]
            g *= steps[None, :]
            self._check(g)
            ints = g.round_().to(torch.int64)
            for acc in accs:
                acc[r : r + ROW_CHUNK] += ints

    def add_total_(self, accs: list[torch.Tensor], total: torch.Tensor) -> None:
        steps, mu_step = self._steps(accs[0].device)
        t = total.to(torch.float64) * steps * mu_step
        self._check(t)
        ints = t.round_().to(torch.int64)
        for acc in accs:
            acc += ints

    def gram(self, acc: torch.Tensor) -> torch.Tensor:
        """The float64 Gram of integer sums ``acc`` (one rounding, to float64's 53 bits)."""
        steps, _ = self._steps(acc.device)
        out = torch.empty(acc.shape, dtype=torch.float64, device=acc.device)
        for r in range(0, acc.shape[0], ROW_CHUNK):
            out[r : r + ROW_CHUNK] = acc[r : r + ROW_CHUNK].to(torch.float64) / steps[r : r + ROW_CHUNK, None]
            out[r : r + ROW_CHUNK] /= steps[None, :]
        return out

    def total(self, acc: torch.Tensor) -> torch.Tensor:
        steps, mu_step = self._steps(acc.device)
        return acc.to(torch.float64) / steps / mu_step

    @staticmethod
    def _check(scaled: torch.Tensor) -> None:
        if scaled.numel() and float(scaled.abs().max()) >= 2.0**FIXED_POINT_BITS:
            raise LoraCompileError(
                "calibration activations grew far beyond those of its first batch (fixed-point range exceeded): "
                "put typical text first in the calibration files"
            )

    def same_as(self, other: FixedPointScale) -> bool:
        return self.count_exponent == other.count_exponent and torch.equal(self.exponents, other.exponents)


@dataclass
class ExactMoments:
    """One site's moments as exact integer sums (``FixedPointScale``), with the odd-sample fold."""

    scale: FixedPointScale
    gram: torch.Tensor  # [d, d] int64, all tokens
    total: torch.Tensor  # [d] int64
    count: int
    odd_gram: torch.Tensor  # [d, d] int64, odd-numbered samples only
    odd_total: torch.Tensor
    odd_count: int
    pinned: torch.Tensor  # [k, d] float64

    @classmethod
    def zeros(cls, scale: FixedPointScale, device: torch.device | str = "cpu") -> ExactMoments:
        d = scale.exponents.numel()

        def z(*shape):
            return torch.zeros(*shape, dtype=torch.int64, device=device)

        return cls(scale, z(d, d), z(d), 0, z(d, d), z(d), 0, torch.zeros(0, d, dtype=torch.float64, device=device))

    def add_(self, x: torch.Tensor, odd: bool) -> None:
        """Add a batch of inputs ``x`` [n, d]: its Gram (``_batch_gram`` on a GPU, float64 on the CPU) on the grid."""
        if x.shape[0] == 0:
            return
        gram = x.to(torch.float64).T @ x.to(torch.float64) if x.device.type == "cpu" else _batch_gram(x)
        total = x.sum(0, dtype=torch.float64)
        # Rounded onto the grid once, added to the whole and (odd samples) to the fold.
        self.scale.add_gram_([self.gram, self.odd_gram] if odd else [self.gram], gram)
        self.scale.add_total_([self.total, self.odd_total] if odd else [self.total], total)
        self.count += x.shape[0]
        self.odd_count += x.shape[0] if odd else 0

    def to(self, device: torch.device | str) -> ExactMoments:
        return ExactMoments(
            self.scale,
            self.gram.to(device),
            self.total.to(device),
            self.count,
            self.odd_gram.to(device),
            self.odd_total.to(device),
            self.odd_count,
            self.pinned.to(device),
        )

    def all_reduce_(self) -> None:
        """Sum over torchrun ranks (exact: integers)."""
        for t in (self.gram, self.total, self.odd_gram, self.odd_total):
            distributed.all_reduce_sum_(t)
        counts = distributed.all_reduce_sum_(torch.tensor([self.count, self.odd_count], dtype=torch.int64))
        self.count, self.odd_count = int(counts[0]), int(counts[1])

    def check_range(self, diagonal: torch.Tensor, key: SiteKey) -> None:
        """Compare the sums' diagonal with a float64 sum of squares: int64 wrap-around shows as a mismatch."""
        steps, _ = self.scale._steps(self.gram.device)
        diag = self.gram.diagonal().to(torch.float64) / steps**2  # G_ii counts 2^(2 e_i − 62) = 1/step_i²
        if not torch.allclose(diag, diagonal.to(diag.device), rtol=1e-6, atol=0):
            raise LoraCompileError(
                f"moments of {key[0]} {key[1]} left the fixed-point range (activations far beyond those of the "
                "first batch): put typical text first in the calibration files"
            )

    def to_moments(self) -> Moments:
        """Float64 moments for the fits, the fold included."""
        fold = Moments(self.scale.gram(self.odd_gram), self.scale.total(self.odd_total), self.odd_count, self.pinned)
        return Moments(self.scale.gram(self.gram), self.scale.total(self.total), self.count, self.pinned, fold)

    def __add__(self, other: ExactMoments) -> ExactMoments:
        if not self.scale.same_as(other.scale):
            raise LoraCompileError(
                "moments on different fixed-point scales cannot be added: combine only shards of one calibration"
            )
        pinned = self.pinned if self.pinned.numel() else other.pinned
        return ExactMoments(
            self.scale,
            self.gram + other.gram,
            self.total + other.total,
            self.count + other.count,
            self.odd_gram + other.odd_gram,
            self.odd_total + other.odd_total,
            self.odd_count + other.odd_count,
            pinned,
        )


@dataclass
class ExactCalibration:
    """Integer moments per site (``calibrate_exact``), and what they were measured on; shards add."""

    model_id: str
    moments: dict[SiteKey, ExactMoments]
    tokens: int = 0
    domains: dict[str, int] = field(default_factory=dict)
    fixed_prefix: list[int] = field(default_factory=list)
    corpus: str = ""  # corpus_hash of the whole calibration text
    batches: tuple[int, int, int] = (0, 0, 0)  # [start, stop) of the text's batch count

    def to_calibration(self, device: torch.device | str | None = None) -> Calibration:
        """Float64 moments, site by site (each site's integers are dropped as it is converted)."""
        moments = {}
        for key in sorted(self.moments):
            exact = self.moments.pop(key)
            m = exact.to_moments()
            moments[key] = m if device is None else m.to(device)
        return Calibration(self.model_id, moments, self.tokens, dict(self.domains), list(self.fixed_prefix))


def encode(loaded: LoadedModel, samples: list[Sample], max_tokens: int = MAX_SAMPLE_TOKENS) -> list[list[int]]:
    return [s.token_ids(loaded.tokenizer, max_tokens) for s in samples]


def padded_batches(
    token_lists: list[list[int]], pad_id: int, batch_tokens: int
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Right-padded batches of similar lengths; yields (sample indices, ids, mask)."""
    order = sorted(range(len(token_lists)), key=lambda i: (len(token_lists[i]), i))
    batch: list[int] = []
    for i in order:
        longest = max([len(token_lists[j]) for j in batch] + [len(token_lists[i])])
        if batch and longest * (len(batch) + 1) > batch_tokens:
            yield _pad(batch, token_lists, pad_id)
            batch = []
        batch.append(i)
    if batch:
        yield _pad(batch, token_lists, pad_id)


def _pad(batch: list[int], token_lists: list[list[int]], pad_id: int):
    width = max(len(token_lists[i]) for i in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, i in enumerate(batch):
        ids[row, : len(token_lists[i])] = torch.tensor(token_lists[i], dtype=torch.long)
        mask[row, : len(token_lists[i])] = 1
    return batch, ids, mask


@contextmanager
def _capturing(loaded: LoadedModel, inputs_of: list[str], outputs_of: list[str], deepest: int):
    """Hooks that record the inputs of ``inputs_of`` and the outputs of ``outputs_of`` (modules),
    and stop the forward after decoder layer ``deepest``."""
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def save_input(name: str) -> Callable:
        def hook(_module, args):
            captured[name] = args[0].detach()

        return hook

    def save_output(name: str) -> Callable:
        def hook(_module, _args, output):
            captured[name] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    def stop(_module, _args, _output):
        raise StopForward

    try:
        handles += [loaded.module(m).register_forward_pre_hook(save_input(m)) for m in inputs_of]
        handles += [loaded.module(m).register_forward_hook(save_output(m)) for m in outputs_of]
        handles.append(loaded.module(loaded.arch.layer_module(deepest)).register_forward_hook(stop))
        yield captured
    finally:
        for h in handles:
            h.remove()


def stream_captured(
    loaded: LoadedModel,
    token_lists: list[list[int]],
    deepest: int,
    inputs_of: Sequence[str] = (),
    outputs_of: Sequence[str] = (),
    description: str = "running model",
    batch_tokens: int = BATCH_TOKENS,
    select: list[int] | None = None,
) -> Iterator[tuple[list[int], torch.Tensor, dict[str, torch.Tensor]]]:
    """The model over right-padded ``batches`` of ``token_lists``, stopped after layer ``deepest``.

    Per batch: (sample indices, mask [B, T] on the CPU, {module: its input or output}) on the
    model's device, in its dtype. Right padding never changes the activations of the text
    before it under causal attention. ``select``: run only these batches (indices into the batch
    list, which depends only on ``token_lists`` and ``batch_tokens``: the same in every process
    and shard).
    """
    batches = list(padded_batches(token_lists, loaded.tokenizer.pad_token_id, batch_tokens))
    if select is not None:
        batches = [batches[i] for i in select]
    with _capturing(loaded, list(inputs_of), list(outputs_of), deepest) as captured, torch.no_grad():
        for batch, ids, mask in track(batches, description):
            captured.clear()
            run_until_stopped(loaded, ids, mask)
            yield batch, mask.bool(), captured


def stream_writer_inputs(
    loaded: LoadedModel,
    keys: list[SiteKey],
    token_lists: list[list[int]],
    description: str = "running model",
    batch_tokens: int = BATCH_TOKENS,
    select: list[int] | None = None,
) -> Iterator[tuple[list[int], torch.Tensor, dict[SiteKey, torch.Tensor]]]:
    """Per batch: (sample indices, mask [B, T] on the CPU, inputs per site [B, T, d_site] on its writer's device).

    ``select``: run only these batches (``stream_captured``).
    """
    keys = sorted(set(keys))
    writers = [w for site, layer in keys for w in loaded.arch.writers(site, layer)]
    deepest = max(layer for _, layer in keys)
    for batch, mask, captured in stream_captured(
        loaded, token_lists, deepest, writers, (), description, batch_tokens, select
    ):
        # Left where the model ran and in its dtype: the moments accumulate there, and each
        # consumer upcasts one site at a time (all sites of a group upcast at once would double
        # the activations' memory).
        inputs = {}
        for site, layer in keys:
            # [B, T, d]: some blocks (OPT's MLP) run their writers on the flattened [B·T, d] tokens.
            parts = [captured[w].reshape(*mask.shape, -1) for w in loaded.arch.writers(site, layer)]
            x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
            if loaded.arch.post_norm(site, layer) is not None:
                x = x.float() / writer_output_rms(loaded, (site, layer), x)
            inputs[(site, layer)] = x
        yield batch, mask, inputs


def post_norm_gain(loaded: LoadedModel, key: SiteKey) -> tuple[torch.Tensor, float]:
    """(gain [d] float64, eps) of the norm between the site's writers and the stream (architectures table)."""
    norm = loaded.module(loaded.arch.post_norm(*key))
    gain = loaded.arch.norm_gain_offset + norm.weight.detach().to(torch.float64).cpu()
    return gain, float(getattr(loaded.model.config, loaded.arch.norm_eps_key))


def writer_output_rms(loaded: LoadedModel, key: SiteKey, x: torch.Tensor) -> torch.Tensor:
    """``rms(y) = √(mean(y²) + eps)`` [..., 1] float32 of the writers' summed output ``y`` for inputs ``x``.

    At a post-norm site the fit is on ``x / rms(y)``: ``a·x/rms(y) ≈ 1`` makes the LoRA add
    ``rms(y)·β``, the delta the norm turns into ``≈ s`` (README "Post-writer norms"). Recomputed from
    the weights (not hooked), so it is the unsteered output even where compiled deltas are active.
    """
    writers = loaded.arch.writers(*key)
    parts = torch.split(x.float(), [loaded.module(w).in_features for w in writers], dim=-1)
    y = 0.0
    for w, part in zip(writers, parts):
        m = loaded.module(w)
        y = y + torch.nn.functional.linear(part, m.weight.float(), None if m.bias is None else m.bias.float())
    _, eps = post_norm_gain(loaded, key)
    return torch.sqrt(y.pow(2).mean(-1, keepdim=True) + eps)


def writer_outputs(loaded: LoadedModel, samples: list[Sample], key: SiteKey, max_tokens: int = 4096) -> torch.Tensor:
    """The post-norm's inputs ``y`` (the writers' summed output) on up to ``max_tokens`` tokens, [n, d] float64."""
    norm = loaded.arch.post_norm(*key)
    out, kept = [], 0
    captures = stream_captured(loaded, encode(loaded, samples), key[1], [norm], (), "reading writer outputs")
    for _, mask, captured in captures:
        y = captured[norm][mask.to(captured[norm].device)].to(torch.float64).cpu()
        out.append(y)
        kept += y.shape[0]
        if kept >= max_tokens:
            captures.close()
            break
    return torch.cat(out)[:max_tokens]


def site_device(loaded: LoadedModel, key: SiteKey) -> torch.device:
    """Where a site's writer inputs are, and so its moments (its layer's GPU, for a split model)."""
    return loaded.device_of(loaded.arch.writers(*key)[0])


def site_dim(loaded: LoadedModel, key: SiteKey) -> int:
    site, layer = key
    return sum(loaded.in_features(w) for w in loaded.arch.writers(site, layer))


def batch_count(loaded: LoadedModel, token_lists: list[list[int]], batch_tokens: int = BATCH_TOKENS) -> int:
    """How many batches the calibration text makes (shards and ranks split these)."""
    return sum(1 for _ in padded_batches(token_lists, loaded.tokenizer.pad_token_id, batch_tokens))


def corpus_hash(token_lists: list[list[int]], batch_tokens: int = BATCH_TOKENS) -> str:
    """sha256 of the calibration token ids (and the batching): what makes shards of one calibration."""
    h = hashlib.sha256(f"batch_tokens={batch_tokens};max_tokens={MAX_SAMPLE_TOKENS};".encode())
    for ids in token_lists:
        h.update(len(ids).to_bytes(4, "little"))
        h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def calibrate(
    loaded: LoadedModel,
    samples: list[Sample],
    keys: list[SiteKey],
    batch_tokens: int = BATCH_TOKENS,
) -> Calibration:
    """Accumulate the moments of the writer inputs of ``keys`` over ``samples`` (float64 for the fits).

    Under torchrun the ranks split the batches (``calibrate_exact``); the result is the same bits.
    """
    return calibrate_exact(loaded, samples, keys, batch_tokens).to_calibration()


def calibrate_exact(
    loaded: LoadedModel,
    samples: list[Sample],
    keys: list[SiteKey],
    batch_tokens: int = BATCH_TOKENS,
    shard: tuple[int, int] | None = None,
) -> ExactCalibration:
    """Fixed-point moment sums of the writer inputs of ``keys``: exact, so they add in any order.

    The batches are fixed by the text alone; ``shard`` ``(i, n)`` takes the i-th of n contiguous
    shares of them, and under torchrun each rank takes a share of that and the ranks' integer
    sums are all-reduced. Every process first runs batch 0 to fix the scale (``FixedPointScale``).
    """
    keys = sorted(set(keys))
    for _, layer in keys:
        loaded.check_layer(layer)
    token_lists = encode(loaded, samples)
    device = {k: site_device(loaded, k) for k in keys}
    count = batch_count(loaded, token_lists, batch_tokens)
    part, parts = shard if shard is not None else (0, 1)
    shard_range = distributed.share(count, part, parts)
    mine = [shard_range[i] for i in distributed.share(len(shard_range))]
    total_tokens = sum(len(t) for t in token_lists)
    # Two d×d int64 sums per site (all tokens, and the odd fold): scan.site_moments_bytes.
    sums: dict[SiteKey, ExactMoments] = {}
    check = {k: torch.zeros(site_dim(loaded, k), dtype=torch.float64, device=device[k]) for k in keys}
    domains = dict.fromkeys(sorted({s.domain for s in samples}), 0)
    run = ([0] if 0 not in mine else []) + mine  # batch 0 first everywhere: it fixes the scale
    batches = stream_writer_inputs(loaded, keys, token_lists, "calibrating", batch_tokens, select=run)
    for index, (batch, mask, inputs) in zip(run, batches):
        if not sums:
            for key, x in inputs.items():
                probe = FixedPointScale.from_probe(x[mask.to(x.device)], total_tokens)
                sums[key] = ExactMoments.zeros(probe, x.device)
        if index not in mine:
            continue
        is_odd = torch.tensor([i % 2 == 1 for i in batch])[:, None]
        for key, x in inputs.items():
            sums[key].add_(x[(mask & ~is_odd).to(x.device)], odd=False)
            sums[key].add_(x[(mask & is_odd).to(x.device)], odd=True)
            check[key] += (x[mask.to(x.device)].to(torch.float64) ** 2).sum(0)
        for i in batch:
            domains[samples[i].domain] += len(token_lists[i])
    if not sums:  # no text at all: nothing to scale by
        sums = {k: ExactMoments.zeros(FixedPointScale.unit(site_dim(loaded, k)), device[k]) for k in keys}
    for key in keys:
        sums[key].all_reduce_()
        sums[key].check_range(distributed.all_reduce_sum_(check[key]), key)
    names = list(domains)
    counts = distributed.all_reduce_sum_(torch.tensor([domains[d] for d in names], dtype=torch.int64))
    domains = {d: int(n) for d, n in zip(names, counts) if n > 0}
    prefix = loaded.fixed_prefix()
    if prefix:
        for _, _, inputs in stream_writer_inputs(loaded, keys, [prefix], "pinning prefix"):
            for key, x in inputs.items():
                sums[key].pinned = x[0].to(torch.float64)
    return ExactCalibration(
        model_id=loaded.model_id,
        moments=sums,
        tokens=sum(domains.values()),
        domains=domains,
        fixed_prefix=prefix,
        corpus=corpus_hash(token_lists, batch_tokens),
        batches=(shard_range.start, shard_range.stop, count),
    )


@contextmanager
def compiled_deltas(loaded: LoadedModel, steered: dict[SiteKey, tuple[torch.Tensor, torch.Tensor]]):
    """Forward hooks adding what the compiled rank-1 LoRA adds: ``(b·x)·v`` on each site's writers.

    ``steered``: per site, the fitted direction ``b`` (over the concatenated writer
    inputs) and the vector ``v`` (``coef·s``). Each writer adds its part of ``b·x``.
    """
    handles = []

    def adder(part: torch.Tensor, vec: torch.Tensor) -> Callable:
        def hook(_module, args, output):
            return output + (args[0] @ part.to(args[0].dtype))[..., None] * vec.to(output.dtype)

        return hook

    try:
        for (site, layer), (direction, vec) in steered.items():
            writers = loaded.arch.writers(site, layer)
            parts = torch.split(direction, [loaded.in_features(w) for w in writers])
            for writer, part in zip(writers, parts):
                device = loaded.device_of(writer)
                handles.append(loaded.module(writer).register_forward_hook(adder(part.to(device), vec.to(device))))
        yield
    finally:
        for h in handles:
            h.remove()


def calibrate_sequential(
    loaded: LoadedModel,
    samples: list[Sample],
    vectors: dict[SiteKey, torch.Tensor],
    fit: Callable[[SiteKey, Moments], torch.Tensor],
    first: Calibration | None = None,
    batch_tokens: int = BATCH_TOKENS,
) -> tuple[Calibration, dict[SiteKey, torch.Tensor]]:
    """Calibrate and fit the sites of ``vectors`` in layer order, each under the earlier sites' compiled deltas.

    Returns the moments (each measured under the deltas of the sites before it) and
    the directions ``fit(key, moments)``. ``first``: precomputed moments for the
    shallowest site (e.g. from scan); every later site depends on the fits before it,
    so it is calibrated here on ``samples``. Within a layer, ``resid_mid`` comes before
    ``resid_post`` (name order is forward order).

    Cost: one pass over ``samples`` per site, each stopped after its layer, so
    Σ (L_k + 1) decoder layers of compute instead of max (L_k + 1) for an independent
    calibration (layers 8, 10, 12, 14: 48 against 15, 3.2×). Passes cannot be shared:
    site k's inputs depend on the fit of site k − 1 over all of ``samples``.
    """
    moments: dict[SiteKey, Moments] = {}
    directions: dict[SiteKey, torch.Tensor] = {}
    part = first
    for i, key in enumerate(sorted(vectors, key=lambda k: (k[1], k[0]))):
        if i > 0 or part is None or key not in part.moments:
            with compiled_deltas(loaded, {k: (directions[k], vectors[k]) for k in directions}):
                part = calibrate(loaded, samples, [key], batch_tokens)
        moments[key] = part.moments[key]
        directions[key] = fit(key, moments[key])
    calibration = Calibration(loaded.model_id, moments, part.tokens, part.domains, part.fixed_prefix)
    return calibration, directions


@dataclass
class Projections:
    """``b·x`` for every held-out token, with its position and domain."""

    values: torch.Tensor  # [tokens, k] float64, one column per direction
    position: torch.Tensor  # [tokens] long
    domain: list[str]


def project_inputs(
    loaded: LoadedModel,
    samples: list[Sample],
    directions: dict[SiteKey, torch.Tensor],
    batch_tokens: int = BATCH_TOKENS,
) -> dict[SiteKey, Projections]:
    """Project the writer inputs of held-out ``samples`` onto directions ``[k, d]`` per site."""
    keys = sorted(directions)
    token_lists = encode(loaded, samples)
    parts: dict[SiteKey, list[torch.Tensor]] = {k: [] for k in keys}
    positions: list[torch.Tensor] = []
    domains: list[str] = []
    for batch, mask, inputs in stream_writer_inputs(loaded, keys, token_lists, "measuring fit error", batch_tokens):
        pos = torch.arange(mask.shape[1]).expand_as(mask)
        positions.append(pos[mask])
        for row, i in enumerate(batch):
            domains += [samples[i].domain] * int(mask[row].sum())
        for key, x in inputs.items():
            b = directions[key].to(x.device, torch.float64)
            parts[key].append((x[mask.to(x.device)].to(torch.float64) @ b.T).cpu())
    position = torch.cat(positions)
    return {k: Projections(torch.cat(parts[k]), position, domains) for k in keys}


def exact_projections(loaded: LoadedModel, samples: list[Sample]) -> Projections:
    """``b·x = 1`` at every held-out token: the projections of an exact site (fit error 0)."""
    token_lists = encode(loaded, samples)
    position = torch.cat([torch.arange(len(t)) for t in token_lists])
    domains = [s.domain for s, t in zip(samples, token_lists) for _ in t]
    return Projections(torch.ones(len(domains), 1, dtype=torch.float64), position, domains)


def self_generate(
    loaded: LoadedModel,
    prompts: list[Sample],
    count: int,
    max_new_tokens: int = 96,
    seed: int = 0,
    batch_size: int = 16,
) -> list[Sample]:
    """Sample ``count`` responses from the model to chat prompts: the served distribution.

    Returns chats (prompt + the model's reply) in domain ``self_generated``;
    sampling is seeded, so the same inputs give the same samples.
    """
    if count <= 0 or not prompts:
        return []
    tok = loaded.tokenizer
    rng = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(prompts), generator=rng).tolist()
    chosen = [prompts[picks[i % len(picks)]] for i in range(count)]
    out: list[Sample] = []
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        for start in track(range(0, count, batch_size), "self-generating", total=-(-count // batch_size)):
            group = chosen[start : start + batch_size]
            texts = [s.render(tok, add_generation_prompt=True) for s in group]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            torch.manual_seed(seed + start)
            with torch.no_grad():
                gen = loaded.model.generate(
                    **enc.to(loaded.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=True,
                    temperature=0.8,
                    top_p=0.95,
                    pad_token_id=tok.pad_token_id,
                )
            for s, row in zip(group, gen[:, enc["input_ids"].shape[1] :]):
                reply = tok.decode(row, skip_special_tokens=True).strip()
                out.append(Sample("self_generated", messages=s.messages + (("assistant", reply),)))
    finally:
        tok.padding_side = side
    return out


@contextmanager
def _eager_attention(loaded: LoadedModel):
    """Attention weights exist only in the eager kernel (fused kernels never materialise them)."""
    config = loaded.model.config
    before = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


def work_dtype(device: torch.device) -> torch.dtype:
    """The precision sums are formed in on ``device``: float64 on the CPU, float32 on a GPU (``_batch_gram``)."""
    return torch.float64 if device.type == "cpu" else torch.float32


def work_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in its device's ``work_dtype``."""
    return x.to(work_dtype(x.device))


def add_gram_(gram: torch.Tensor, x: torch.Tensor) -> None:
    """``gram += xᵀx`` into a float64 ``gram`` on ``x``'s device (a float32 product on a GPU)."""
    if x.device.type == "cpu":
        x = x.to(torch.float64)
        gram.addmm_(x.T, x)
    else:
        gram += _batch_gram(x)  # float32 added into float64 in place: no float64 copy


@dataclass
class AttentionBatch:
    """One batch at an attention-written site, on its layer's device: what the value route needs.

    ``alpha`` [B, H, T, T]: the attention weights; ``values_inputs`` [B, T, d]: the value
    projection's inputs (both in float32 at least: bfloat16 would round the averages);
    ``writer_inputs`` [B, T, d_w]: the writer's inputs, as the model computed them.
    A LoRA ``B·(a·x)`` on the value projection changes head h's output at token i by exactly
    ``(a·z^h_i)·B^g(h)``, ``z^h_i = Σ_j α^h_ij x_j`` (``fit.value_route``).
    """

    alpha: torch.Tensor
    values_inputs: torch.Tensor
    writer_inputs: torch.Tensor

    def averaged(self, row: int, mask: torch.Tensor) -> torch.Tensor:
        """``z`` [N, H, d] of one sequence's N real tokens (``work_precision``): [T, H, d] per sequence."""
        alpha, x = work_precision(self.alpha[row]), work_precision(self.values_inputs[row])
        return torch.einsum("hij,jd->ihd", alpha, x)[mask[row].to(alpha.device)]

    def averaged_along(self, row: int, mask: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``a·z^h_i`` [N, H] without forming ``z``: the attention-weighted average of ``a·x_j``."""
        alpha, x = work_precision(self.alpha[row]), work_precision(self.values_inputs[row])
        return (alpha @ (x @ a.to(x)))[:, mask[row].to(alpha.device)].T

    def writer(self, row: int, mask: torch.Tensor) -> torch.Tensor:
        """The writer's inputs [N, d_w] of one sequence's real tokens (``work_precision``)."""
        return work_precision(self.writer_inputs[row][mask[row].to(self.writer_inputs.device)])


def stream_attention(
    loaded: LoadedModel,
    site: str,
    layer: int,
    token_lists: list[list[int]],
    description: str = "running model",
    batch_tokens: int = BATCH_TOKENS,
) -> Iterator[tuple[list[int], torch.Tensor, AttentionBatch]]:
    """Per batch: (sample indices, mask [B, T] on the CPU, ``AttentionBatch``) at an attention-written site."""
    attention, values = loaded.arch.attention_route(site, layer)
    seen: dict[str, torch.Tensor] = {}

    def keep_inputs(_module, args):
        seen["x"] = args[0].detach()

    def keep_weights(_module, _args, output):
        seen["alpha"] = output[1].detach()

    handles = [
        loaded.module(values).register_forward_pre_hook(keep_inputs),
        loaded.module(attention).register_forward_hook(keep_weights),
    ]
    try:
        with _eager_attention(loaded):
            batches = stream_writer_inputs(loaded, [(site, layer)], token_lists, description, batch_tokens)
            for batch, mask, inputs in batches:
                alpha, x = (t if t.dtype == torch.float64 else t.float() for t in (seen.pop("alpha"), seen.pop("x")))
                yield batch, mask, AttentionBatch(alpha, x, inputs[(site, layer)])
    finally:
        for h in handles:
            h.remove()
