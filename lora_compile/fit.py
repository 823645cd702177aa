"""Fit pass: the input direction ``b`` of a writer whose projection ``b·x`` is ≈ 1 on every token.

Ridge (default): minimise ``Σ (b·x_t − 1)² + λ‖b‖²`` → ``b = (G + λI)⁻¹ μ``, with the
fixed-prefix positions pinned to exactly ``b·x = 1`` (equality-constrained least
squares). Axis (baseline): the best single input coordinate, the "outlier
dimension" method. See DESIGN §2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .calibrate import Moments, Projections, add_gram_
from .errors import LoraCompileError

DIRECTION_METHODS = ("ridge", "axis")
# λ is relative to the mean eigenvalue of G (trace(G)/d), so it is scale-free. By
# default it is chosen per site by two-fold cross-validation over this grid.
RIDGE_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FALLBACK_RIDGE = 1e-4  # when the moments carry no fold to cross-validate on
# A fixed-prefix position is pinned only where its input is not much smaller than a
# typical token's: at the attention sink the MLP input nearly vanishes (SmolLM2
# down_proj: norm 0.5 against 12), and forcing b·x = 1 there costs every other
# token (held-out RMS 0.18 → 0.46 at resid_post 18).
PIN_MIN_NORM_RATIO = 0.25


def squared_error(b: torch.Tensor, moments: Moments) -> float:
    """``Σ (b·x − 1)²`` over the tokens behind ``moments``, exactly, from G and μ."""
    return float(b @ moments.gram @ b - 2 * b @ moments.total + moments.count)


def choose_ridge(moments: Moments, grid: tuple[float, ...] = RIDGE_GRID) -> float:
    """The λ of ``grid`` with the least two-fold cross-validated error on calibration data."""
    fold = moments.fold
    if fold is None or fold.count == 0 or fold.count == moments.count:
        return FALLBACK_RIDGE
    rest = moments - fold
    rest.pinned = fold.pinned = moments.pinned
    errors = [squared_error(fit_ridge(rest, lam), fold) + squared_error(fit_ridge(fold, lam), rest) for lam in grid]
    return grid[min(range(len(grid)), key=errors.__getitem__)]


def fit_ridge(moments: Moments, ridge: float | None = None, pin: bool = True) -> torch.Tensor:
    """Ridge constant direction; pinned positions satisfy ``b·x = 1`` exactly.

    ``ridge`` None: chosen by cross-validation (``choose_ridge``).
    """
    if moments.count == 0:
        raise LoraCompileError("calibration saw no tokens: give it non-empty text")
    if ridge is None:
        ridge = choose_ridge(moments)
    gram, mu = moments.gram, moments.total
    lam = ridge * torch.trace(gram) / moments.dim
    # Solved where the moments are, in float64 (on a GPU a 14336² Cholesky takes a fraction of a
    # second); λ added on the diagonal in place, so the fit holds two d×d matrices (h, its factor), not four.
    h = gram.clone()
    h.diagonal().add_(lam)
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info):
        # The sums are exact only to the fixed-point grid (~2^-44 of G_ii): a ridge below that
        # cannot make a singular Gram positive definite.
        raise LoraCompileError(
            f"the calibration moments are singular at ridge {ridge:g}: use a larger --ridge (e.g. 1e-8) "
            "or more calibration text"
        )
    b = torch.cholesky_solve(mu[:, None], chol)[:, 0]
    pinned = pinnable(moments) if pin else moments.pinned[:0]
    if pinned.numel():
        # b = H⁻¹(μ + P ν) with Pᵀb = 1: solve the small k×k system for ν.
        h_inv_p = torch.cholesky_solve(pinned.T.contiguous(), chol)  # [d, k]
        lhs = pinned @ h_inv_p
        rhs = 1.0 - pinned @ b
        # k×k, solved on the CPU: CUDA's lstsq has no gelsd (rank-revealing) driver.
        nu = torch.linalg.lstsq(lhs.cpu(), rhs[:, None].cpu(), driver="gelsd").solution[:, 0]
        b = b + h_inv_p @ nu.to(b.device)
    return b


def pinnable(moments: Moments) -> torch.Tensor:
    """The fixed-prefix inputs the ridge fit pins (see PIN_MIN_NORM_RATIO)."""
    typical = torch.sqrt(torch.trace(moments.gram) / max(moments.count, 1))
    keep = moments.pinned.norm(dim=-1) >= PIN_MIN_NORM_RATIO * typical
    return moments.pinned[keep]


def fit_axis(moments: Moments) -> torch.Tensor:
    """Best one-coordinate direction: ``b = c·e_j`` minimising the calibration error."""
    if moments.count == 0:
        raise LoraCompileError("calibration saw no tokens: give it non-empty text")
    diag = torch.diagonal(moments.gram).clamp_min(1e-30)
    mu = moments.total
    residual = moments.count - mu**2 / diag  # Σ (c x_j − 1)² at the optimal c
    j = int(torch.argmin(residual))
    b = torch.zeros_like(mu)
    b[j] = mu[j] / diag[j]
    return b


def check_direction_method(method: str) -> str:
    if method not in DIRECTION_METHODS:
        raise LoraCompileError(f"unknown direction method {method!r}: use one of {', '.join(DIRECTION_METHODS)}")
    return method


def fit_direction(moments: Moments, method: str = "ridge", ridge: float | None = None) -> torch.Tensor:
    if check_direction_method(method) == "ridge":
        return fit_ridge(moments, ridge)
    return fit_axis(moments)


def outlier_dimensions(moments: Moments, top: int = 5) -> list[dict]:
    """Input coordinates with the largest |mean|/std: the seed's 'outlier dimensions'."""
    n = max(moments.count, 1)
    mean = moments.total / n
    var = (torch.diagonal(moments.gram) / n - mean**2).clamp_min(1e-30)
    ratio = mean.abs() / var.sqrt()
    idx = torch.argsort(ratio, descending=True)[:top]
    return [
        {"dim": int(i), "mean": float(mean[i]), "std": float(var[i].sqrt()), "mean_over_std": float(ratio[i])}
        for i in idx
    ]


@dataclass
class FitError:
    """Statistics of ``b·x − 1`` on held-out tokens: the relative error of the compiled delta."""

    rms: float
    max: float
    bias: float
    tokens: int
    rms_first: float  # position 0
    rms_rest: float  # positions ≥ 1

    def to_dict(self) -> dict:
        return asdict(self)


def _stats(err: torch.Tensor) -> tuple[float, float, float]:
    if err.numel() == 0:
        return float("nan"), float("nan"), float("nan")
    return float(err.pow(2).mean().sqrt()), float(err.abs().max()), float(err.mean())


def fit_error(values: torch.Tensor, position: torch.Tensor) -> FitError:
    err = values.to(torch.float64) - 1.0
    rms, mx, bias = _stats(err)
    return FitError(
        rms=rms,
        max=mx,
        bias=bias,
        tokens=int(err.numel()),
        rms_first=_stats(err[position == 0])[0],
        rms_rest=_stats(err[position > 0])[0],
    )


# The held-out KL ratio, KL(true addition ‖ adapter) / KL(true addition ‖ unsteered), predicted from
# the held-out fit error e (RMS of b·x − 1). The writer's error at token i is (b·x_i − 1)·v, along
# the vector itself, so to second order in the logits that token's KL is e_i² times the unsteered
# one's, and the ratio is ≈ mean(e_i²) = e². At coefficient 4 the unsteered KL grows more slowly
# than quadratically; the constant is the geometric mean of ratio / e² over measured adapters
# (README "What each site delivers": both routes, 8 layers and the calibration-size curve).
KL_RATIO_PER_SQUARED_ERROR = 0.75


def predicted_kl_ratio(fit_error: float) -> float:
    """The held-out KL ratio an adapter with held-out fit error ``fit_error`` is expected to reach."""
    return KL_RATIO_PER_SQUARED_ERROR * fit_error**2


def fit_errors(projections: Projections, column: int = 0) -> dict[str, FitError]:
    """Fit error overall (key ``"all"``) and per domain, for one direction column."""
    values = projections.values[:, column]
    out = {"all": fit_error(values, projections.position)}
    domains = sorted(set(projections.domain))
    labels = torch.tensor([domains.index(d) for d in projections.domain])
    for k, d in enumerate(domains):
        sel = labels == k
        out[d] = fit_error(values[sel], projections.position[sel])
    return out


@dataclass
class ValueRoute:
    """A vector split between the value projection (through attention) and the writer.

    ``values_b``: the value-projection LoRA's B (KV heads × head size), the least-norm
    ``B`` with ``W_o R B`` closest to the vector (R repeats each KV head for its query
    heads); ``per_head[:, h] = W_o^h B^g(h)``, what head h adds to the site per unit of
    ``a·z^h`` (their sum is ``W_o R B``); ``rest``: the part no value-projection LoRA can
    reach (orthogonal to the span of ``W_o R``), left to the writer's own LoRA.
    ``moment_root``: ``root`` with ``rootᵀ root = per_headᵀ per_head``, formed once with the
    split (``add_value_route_moments``).
    """

    values_b: torch.Tensor  # [kv · head_dim] float64
    per_head: torch.Tensor  # [d, H] float64
    rest: torch.Tensor  # [d] float64
    head_values: torch.Tensor  # [H, head_dim] float64: values_b as each query head sees it
    moment_root: torch.Tensor  # [H, H] float64

    def writer_input_shift(self, za: torch.Tensor) -> torch.Tensor:
        """What the value LoRA ``B·(a·x)`` adds to the writer's input, [N, H·head_dim] for ``za = a·z`` [N, H].

        A LoRA on the writer as well sees its input shifted by this: its direction must be
        fitted on the shifted inputs, or ``b·Δu`` adds a spurious multiple of its vector.
        """
        return (za[:, :, None] * self.head_values.to(za)[None]).reshape(za.shape[0], -1)

    def to(self, device: torch.device, dtype: torch.dtype) -> ValueRoute:
        """This route on ``device`` in ``dtype``: moved once before a pass, not per sequence."""
        fields = (self.values_b, self.per_head, self.rest, self.head_values, self.moment_root)
        return ValueRoute(*(t.to(device, dtype) for t in fields))

    @property
    def reached(self) -> float:
        """Fraction of the vector's squared norm the value route can carry."""
        reach = self.per_head.sum(1)
        return float(reach @ reach / (reach @ reach + self.rest @ self.rest))


def value_route(writer_weight: torch.Tensor, attention_shape: tuple[int, int, int], vector: torch.Tensor) -> ValueRoute:
    """Split ``vector`` for a site written by ``writer_weight`` ([d, H·head_dim], e.g. ``o_proj``)."""
    heads, kv, head_dim = attention_shape
    w = writer_weight.to(torch.float64)
    group = heads // kv
    per_head_w = w.reshape(w.shape[0], heads, head_dim)
    reach_map = per_head_w.reshape(w.shape[0], kv, group, head_dim).sum(2).reshape(w.shape[0], kv * head_dim)
    v = vector.to(torch.float64)
    b = torch.linalg.lstsq(reach_map, v[:, None], driver="gelsd").solution[:, 0]
    b_heads = b.reshape(kv, head_dim).repeat_interleave(group, 0)  # [H, head_dim]
    per_head = torch.einsum("dhk,hk->dh", per_head_w, b_heads)
    evals, evecs = torch.linalg.eigh(per_head.T @ per_head)
    return ValueRoute(
        values_b=b,
        per_head=per_head,
        rest=v - per_head.sum(1),
        head_values=b_heads,
        moment_root=evals.clamp_min(0).sqrt()[:, None] * evecs.T,
    )


def add_value_route_moments(moments: Moments, z: torch.Tensor, route: ValueRoute) -> None:
    """Accumulate ``Σ_i ‖C (Z_i a − 1)‖²`` as ridge moments in ``a`` (C = ``route.per_head``).

    With ``K = CᵀC = RᵀR`` each token gives H rows ``y = R Z_i`` with targets ``t = R·1``:
    ``gram += Σ yyᵀ``, ``total += Σ y t``, ``count += Σ t²`` (for the plain fit every target
    is 1), so ``squared_error`` and the ridge solve apply unchanged. Scaled by ``1/‖v‖²``,
    the error is the relative error of the added vector's reachable part.
    """
    root = route.moment_root.to(z)  # no copy where the route was moved to z's device (``ValueRoute.to``)
    target = root.sum(1)
    # z in its own precision (float32 on a GPU), the sums in float64 where the moments are.
    y = torch.einsum("kh,nhd->nkd", root, z).reshape(-1, z.shape[-1])
    t = target.repeat(z.shape[0]).to(z)
    add_gram_(moments.gram, y)
    moments.total += (y.T @ t).to(torch.float64)
    moments.count += float(t.to(torch.float64) @ t.to(torch.float64))


# Tikhonov starting points for the post-norm vector, relative to mean(g²): the smallest is the
# first-order inverse s/g; larger ones give up the coordinates where the gain is near zero.
GAIN_TIKHONOV_GRID = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class PostNormFit:
    """The writer's LoRA vector ``β`` for a site behind a post-writer norm, and what it achieves.

    Errors are RMS over calibration tokens of ``‖N(y + rms(y)·β) − N(y) − s‖ / ‖s‖`` (the
    site's delta against true addition, with the writer's fit ``a·h = rms(y)`` taken as exact).
    """

    vector: torch.Tensor  # β [d] float64
    site_error_first_order: float  # β = s/g
    site_error: float  # β as chosen
    tikhonov: float  # the grid start the refinement began from (relative to mean g²)
    tokens: int

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "vector"}


def post_norm_site_error(y: torch.Tensor, gain: torch.Tensor, eps: float, s: torch.Tensor, beta: torch.Tensor):
    """Per-token ``N(y + rms(y)·β) − N(y) − s`` for RMSNorm ``N(z) = g·z/√(mean z² + eps)``, [n, d]."""

    def norm(z: torch.Tensor) -> torch.Tensor:
        return gain * z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + eps)

    r = torch.sqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return norm(y + r * beta) - norm(y) - s


def fit_post_norm_vector(
    y: torch.Tensor, gain: torch.Tensor, eps: float, s: torch.Tensor, iterations: int = 100
) -> PostNormFit:
    """``β`` minimising the mean squared site error over the writer outputs ``y`` [n, d].

    The norm's output has a fixed (gain-weighted) RMS, so ``N(y) + s`` is generally out of reach:
    with ``β = s/g`` the output is ``(N(y) + s)/ρ``, ``ρ = rms(y/rms(y) + s/g)``: the right direction,
    the wrong length. Where the gain is near zero, ``s/g`` is huge and ``ρ`` shrinks everything.
    So: the best Tikhonov-regularised inverse ``β = s·g/(g² + τ)`` over a grid of ``τ``, refined by
    L-BFGS on the exact error (float64, deterministic).
    """
    y, g, s = y.to(torch.float64), gain.to(torch.float64), s.to(torch.float64)
    scale = float(s.norm()) or 1.0

    def loss(beta: torch.Tensor) -> torch.Tensor:
        return post_norm_site_error(y, g, eps, s, beta).pow(2).sum(-1).mean() / scale**2

    mean_g2 = float(g.pow(2).mean())
    starts = [(t, s * g / (g.pow(2) + t * mean_g2)) for t in GAIN_TIKHONOV_GRID]
    with torch.no_grad():
        first = float(loss(starts[0][1]).sqrt())
        tau, start = min(starts, key=lambda ts: float(loss(ts[1])))
    beta = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([beta], max_iter=iterations, line_search_fn="strong_wolfe", tolerance_grad=1e-12)

    def closure():
        opt.zero_grad()
        value = loss(beta)
        value.backward()
        return value

    opt.step(closure)
    beta = beta.detach()
    with torch.no_grad():
        chosen = float(loss(beta).sqrt())
        if not chosen <= float(loss(start).sqrt()):  # a failed refinement keeps its start
            beta, chosen = start, float(loss(start).sqrt())
    return PostNormFit(beta, first, chosen, tau, int(y.shape[0]))
