"""The value route into an attention-written site: a second rank-1 LoRA, on the value projection.

A LoRA ``B·(a·x)`` on the value projection changes head h's output at token i by exactly
``(a·z^h_i)·B^g(h)``, ``z^h_i = Σ_j α^h_ij x_j`` (attention weights sum to 1), and the writer
(``o_proj``) maps that into the stream. The token-to-token variation of ``a·x`` is averaged by
attention, so ``a·z ≈ 1`` is easier to meet than ``b·u ≈ 1`` on the writer's own input. Only the
part of the vector in the span of the writer over the (repeated) KV heads is reachable this way
(``fit.value_route``); the rest goes through the writer's LoRA, fitted on its input as the adapter
will see it: shifted by the value LoRA's own output (a direction constant by construction).

Three passes, each stopped after the site's layer, with eager attention (the weights are needed):
the value LoRA's moments, the shifted writer inputs' moments (they depend on ``a``), and the
held-out error of the two LoRAs together, which decides where the route is kept.

The next-layer route into ``resid_post L`` (``next_layer_steering``): adding ``v`` there is adding
it to the stream entering layer L+1, so ``resid_mid L+1`` gains ``v`` plus that layer's attention's
response ``Δ_i`` to it. No module of layer L but ``down_proj`` writes after the MLP, whose input
has no direction as constant as attention's; a LoRA writing ``resid_mid L+1`` (``o_proj`` of
layer L+1, with the value route where it wins) can add the best constant, ``v + mean Δ`` (over the
calibration tokens). What it leaves is the token-to-token variation of ``Δ``: the route is judged
by held-out KL against true ``resid_post L`` steering, never by its own fit error.
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .calibrate import (
    BATCH_TOKENS,
    Moments,
    SiteKey,
    StopForward,
    padded_batches,
    run_until_stopped,
    stream_attention,
    work_dtype,
)
from .emit import Factors, balanced
from .errors import LoraCompileError
from .fit import ValueRoute, add_value_route_moments, choose_ridge, fit_ridge, value_route
from .models import LoadedModel
from .progress import track
from .vectors import SteeringVector
from .verify import true_addition

# writer: the writer's LoRA alone; both: value route plus the writer for the rest;
# auto: both where its held-out error is below the writer's alone; next_layer (resid_post L only):
# through layer L+1's attention writer, with the value route there where it wins.
ROUTES = ("writer", "both", "auto", "next_layer")


def check_route(route: str) -> str:
    if route not in ROUTES:
        raise LoraCompileError(f"unknown route {route!r}: use one of {', '.join(ROUTES)}")
    return route


def has_value_route(loaded: LoadedModel, key: SiteKey) -> bool:
    try:
        value_route_modules(loaded, key)
    except LoraCompileError:
        return False
    return True


def value_route_modules(loaded: LoadedModel, key: SiteKey) -> tuple[str, str]:
    """(value projection, writer) of an attention-written site; a one-line error where there is no value route."""
    _, values = loaded.arch.attention_route(*key)
    writers = loaded.arch.writers(*key)
    if len(writers) != 1:
        raise LoraCompileError(f"{key[0]} {key[1]} has {len(writers)} writers: the value route needs one")
    return values, writers[0]


@dataclass
class ValueRouteFit:
    """The two LoRAs of the value route at one site and their held-out error."""

    values_module: str
    writer: str
    route: ValueRoute
    values_direction: torch.Tensor  # a [d], on the value projection's input
    writer_direction: torch.Tensor  # b [d_w], on the writer's input shifted by the value LoRA
    ridge: dict[str, float]
    # RMS over held-out tokens of ‖added − vector‖ / ‖vector‖, per domain and "all"
    heldout_error: dict[str, float]
    tokens: int

    def factors(self) -> Factors:
        """Balanced rank-1 factors of both LoRAs (writer module → ``(A [1, in], B [out, 1])``)."""
        return balanced(
            {
                self.values_module: (self.values_direction[None], self.route.values_b[:, None]),
                self.writer: (self.writer_direction[None], self.route.rest[:, None]),
            }
        )

    def to_dict(self) -> dict:
        return {
            "values_module": self.values_module,
            "reached": self.route.reached,
            "ridge": self.ridge,
            "heldout_error": self.heldout_error,
            "tokens": self.tokens,
        }


def _two_folds(dim: int, device: torch.device) -> list[Moments]:
    return [Moments.zeros(dim, device), Moments.zeros(dim, device)]


def _solve(folds: list[Moments], ridge: float | None) -> tuple[torch.Tensor, float]:
    """Ridge fit on both folds, λ by two-fold cross-validation unless given (no pinned positions)."""
    whole = folds[0] + folds[1]
    whole.fold = folds[1]
    lam = ridge if ridge is not None else choose_ridge(whole)
    return fit_ridge(whole, lam, pin=False), lam


def fit_value_route(
    loaded: LoadedModel,
    key: SiteKey,
    vector: torch.Tensor,
    calibration: list[list[int]],
    heldout: list[list[int]],
    heldout_domains: list[str],
    ridge: float | None = None,
) -> ValueRouteFit:
    """Fit the value route for ``vector`` (coef included) at ``key`` and measure it on ``heldout``.

    ``calibration``/``heldout``: token lists; ``heldout_domains``: the domain of each held-out list.
    Samples alternate between two folds (odd ones: the second), as ``calibrate`` splits them.
    """
    values, writer = value_route_modules(loaded, key)
    # The split is solved on the CPU in float64 (a small least-squares problem); the passes run
    # where the model is, in its working precision (float64 on the CPU, float32 on a GPU), with
    # the moments summed in float64 there, as calibrate's are.
    route = value_route(loaded.module(writer).weight.detach().cpu(), loaded.attention_shape, vector.cpu())
    values_device, writer_device = loaded.device_of(values), loaded.device_of(writer)
    # The route and the fitted directions go to each pass's device and precision once, not per sequence.
    at_values = (values_device, work_dtype(values_device))
    at_writer = (writer_device, work_dtype(writer_device))
    label = f"{key[0]} {key[1]} value route"

    value_folds = _two_folds(loaded.in_features(values), values_device)
    route_at_values = route.to(*at_values)
    for batch, mask, seen in stream_attention(loaded, *key, calibration, f"{label}: values"):
        for row, i in enumerate(batch):
            add_value_route_moments(value_folds[i % 2], seen.averaged(row, mask), route_at_values)
    a, ridge_values = _solve(value_folds, ridge)
    a_work = a.to(*at_values)

    writer_folds = _two_folds(loaded.in_features(writer), writer_device)
    route_at_writer = route.to(*at_writer)
    for batch, mask, seen in stream_attention(loaded, *key, calibration, f"{label}: writer"):
        for row, i in enumerate(batch):
            u = seen.writer(row, mask)
            za = seen.averaged_along(row, mask, a_work).to(u)
            writer_folds[i % 2].add_(u + route_at_writer.writer_input_shift(za))
    b, ridge_writer = _solve(writer_folds, ridge)
    b_work = b.to(*at_writer)

    squares: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for batch, mask, seen in stream_attention(loaded, *key, heldout, f"{label}: held-out"):
        for row, i in enumerate(batch):
            u = seen.writer(row, mask)
            za = seen.averaged_along(row, mask, a_work).to(u)
            writer_error = (u + route_at_writer.writer_input_shift(za)) @ b_work - 1
            error = (za - 1) @ route_at_writer.per_head.T + writer_error[:, None] * route_at_writer.rest
            for domain in (heldout_domains[i], "all"):
                squares[domain] += float(error.pow(2).sum())
                counts[domain] += za.shape[0]
    norm = float(vector.to(torch.float64).norm())
    errors = {d: math.sqrt(squares[d] / counts[d]) / norm for d in sorted(squares)}
    a, b = a.cpu(), b.cpu()  # fitted where the moments were; emitted on the CPU
    return ValueRouteFit(
        values_module=values,
        writer=writer,
        route=route,
        values_direction=a,
        writer_direction=b,
        ridge={"values": ridge_values, "writer": ridge_writer},
        heldout_error=errors,
        tokens=counts["all"],
    )


def next_layer_site(loaded: LoadedModel, key: SiteKey) -> SiteKey:
    """``resid_mid L+1``, where the next-layer route writes ``resid_post L``; a one-line error where it cannot."""
    site, layer = key
    if site != "resid_post":
        raise LoraCompileError(
            f"--route next_layer writes resid_post L through layer L+1's attention, not {site}: "
            "use --route writer, both or auto there"
        )
    if layer + 1 >= loaded.num_layers:
        raise LoraCompileError(
            f"resid_post {layer} is the last layer's output: there is no layer {layer + 1} to write it through; "
            "use --route writer"
        )
    target = ("resid_mid", layer + 1)
    try:
        loaded.arch.writers(*target)
        reason = loaded.arch.approximate_reason(target[0])
    except LoraCompileError as err:
        raise LoraCompileError(f"--route next_layer needs resid_mid {layer + 1}: {err}; use --route writer") from None
    if reason is not None:
        raise LoraCompileError(f"--route next_layer needs an exact resid_mid {layer + 1}: {reason}; use --route writer")
    return target


def mean_attention_response(
    loaded: LoadedModel, key: SiteKey, vector: torch.Tensor, token_lists: list[list[int]]
) -> torch.Tensor:
    """Mean over tokens of what layer L+1's attention output changes by when ``vector`` (coef included)
    is added at ``resid_post L`` (``key``): one unsteered and one steered run per batch, each stopped
    at that output. float64, on the CPU."""
    site, layer = key
    writes = loaded.arch.hook_module(*next_layer_site(loaded, key))
    adding = SteeringVector({layer: vector}, site)
    seen: list[torch.Tensor] = []

    def keep(_module, _args, output):
        seen.append((output[0] if isinstance(output, tuple) else output).detach())
        raise StopForward

    device = loaded.device_of(writes)
    total, count = torch.zeros(loaded.hidden_size, dtype=torch.float64, device=device), 0
    batches = list(padded_batches(token_lists, loaded.tokenizer.pad_token_id, BATCH_TOKENS))
    handle = loaded.module(writes).register_forward_hook(keep)
    try:
        with torch.no_grad():
            for _, ids, mask in track(batches, f"resid_post {layer}: layer {layer + 1}'s attention response"):
                seen.clear()
                for steered in (False, True):
                    with true_addition(loaded, adding) if steered else nullcontext():
                        run_until_stopped(loaded, ids, mask)
                change = (seen[1].to(torch.float64) - seen[0].to(torch.float64))[mask.bool().to(device)]
                total, count = total + change.sum(0), count + change.shape[0]
    finally:
        handle.remove()
    return (total / max(count, 1)).cpu()


def next_layer_steering(
    loaded: LoadedModel, steering: SteeringVector, coef: float, token_lists: list[list[int]]
) -> tuple[SteeringVector, dict]:
    """The ``resid_mid L+1`` vector whose addition stands in for ``coef·v`` at ``resid_post L``, and the
    report's ``next_layer``: ``v + mean Δ / coef`` (compiled at ``coef``, the adapter adds ``coef·v + mean Δ``)."""
    if len(steering.layers) != 1:
        raise LoraCompileError(
            f"--route next_layer compiles one layer at a time, got {len(steering.layers)}: pass --layers L"
        )
    (layer,) = steering.layers
    site, target = (steering.site, layer), next_layer_site(loaded, (steering.site, layer))
    v = steering.directions[layer].to(torch.float64)
    response = mean_attention_response(loaded, site, coef * v, token_lists) if coef else torch.zeros_like(v)
    direction = v + response / coef if coef else v
    report = {
        "layer": layer,
        "writes": list(target),
        "vector_norm": float(abs(coef) * v.norm()),
        "mean_response_norm": float(response.norm()),
    }
    return SteeringVector(
        {target[1]: direction.to(steering.directions[layer].dtype)}, target[0], steering.metadata
    ), report
