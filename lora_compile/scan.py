"""Scan pass: where in this model are constant directions, and how good are they.

For every layer and site: held-out fit error of the ridge and the one-axis
directions (overall, per domain, first token separately), the top outlier
dimensions, and the sites to recommend.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from . import distributed
from .calibrate import Calibration, SiteKey, calibrate, project_inputs, site_device, site_dim
from .corpus import Sample
from .devices import device_memory_bytes
from .errors import LoraCompileError
from .fit import (
    KL_RATIO_PER_SQUARED_ERROR,
    choose_ridge,
    fit_axis,
    fit_errors,
    fit_ridge,
    outlier_dimensions,
    predicted_kl_ratio,
)
from .models import LoadedModel

RECOMMEND = 3


# Of the memory free on the model's device after loading, the share a scan's moments may take; the
# rest is for the batch's activations and the fits' temporaries (3 d×d matrices, see plan_layer_groups).
MOMENTS_MEMORY_SHARE = 0.85


def site_moments_bytes(loaded: LoadedModel, key: SiteKey) -> int:
    """Bytes of one site's moments: two d×d float64 Grams (all tokens, and the cross-validation fold)."""
    d = site_dim(loaded, key)
    return 2 * 8 * (d * d + d)


def moments_bytes_by_layer(loaded: LoadedModel, keys: list[SiteKey]) -> dict[int, int]:
    """Bytes of each layer's moments (all its sites in ``keys``)."""
    by_layer: dict[int, int] = {}
    for key in keys:
        by_layer[key[1]] = by_layer.get(key[1], 0) + site_moments_bytes(loaded, key)
    return by_layer


def plan_layer_groups(
    loaded: LoadedModel, keys: list[SiteKey], group_layers: int | None = None, free_bytes: int | None = None
) -> list[list[int]]:
    """Layers calibrated together (consecutive on one device), so a scan never holds every layer's moments at once.

    ``group_layers``: that many layers per group. Otherwise as many layers per group as fit in
    ``MOMENTS_MEMORY_SHARE`` of the free memory (``free_bytes``, measured when None) less what
    fitting the largest site needs (its Gram's ``G − fold``, ``G + λI`` and Cholesky factor), on
    every device: a model split across GPUs keeps each site's moments on its layer's GPU.
    Each group costs a forward pass over the calibration text up to its deepest layer.
    """
    layers = sorted({layer for _, layer in keys})
    if group_layers is not None:
        return [layers[i : i + group_layers] for i in range(0, len(layers), group_layers)]
    per_layer = moments_bytes_by_layer(loaded, keys)
    device = {k[1]: site_device(loaded, k) for k in keys}
    largest_gram = max(site_moments_bytes(loaded, k) for k in keys) // 2
    budget = {
        d: MOMENTS_MEMORY_SHARE * (device_memory_bytes(d) if free_bytes is None else free_bytes) - 3 * largest_gram
        for d in set(device.values())
    }
    # Each device fills groups in layer order; on a split model the next GPU's layers start again
    # at the first group, so a group holds a share of every GPU (fewer groups, and fewer passes,
    # than consecutive layers that all sit on one GPU). On one device: consecutive layers.
    groups: list[list[int]] = []
    used: list[dict] = []
    current = dict.fromkeys(budget, 0)
    for layer in layers:
        here = device[layer]
        g = current[here]
        if g < len(groups) and used[g][here] and used[g][here] + per_layer[layer] > budget[here]:
            g = current[here] = g + 1
        if g == len(groups):
            groups.append([])
            used.append(dict.fromkeys(budget, 0))
        groups[g].append(layer)
        used[g][here] += per_layer[layer]
    return [sorted(g) for g in groups]


def memory_plan(loaded: LoadedModel, keys: list[SiteKey], groups: list[list[int]]) -> dict:
    """What a scan's moments cost: all layers at once against the largest group actually held."""
    by_layer = moments_bytes_by_layer(loaded, keys)
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    return {
        "layer_groups": groups,
        "model_weights_bytes": weights,
        "moments_bytes_all_layers": sum(by_layer.values()),
        "moments_bytes_largest_group": max(sum(by_layer.get(layer, 0) for layer in g) for g in groups),
    }


def scan_in_groups(
    loaded: LoadedModel,
    samples: list[Sample],
    heldout: list[Sample],
    keys: list[SiteKey],
    groups: list[list[int]],
    ridge: float | None = None,
) -> tuple[dict, Calibration | None]:
    """Calibrate, fit and measure one group of layers at a time; each group's moments are dropped after it.

    Returns the scan result and, for a single group, its calibration moved to the CPU (for
    ``compile``); several groups keep no moments (None), since keeping them is what the groups avoid.
    """
    rows: list[dict] = []
    for group in groups:
        calibration = calibrate(loaded, samples, [k for k in keys if k[1] in group])
        if distributed.is_main():  # under torchrun the other ranks only help calibrate
            rows += site_rows(loaded, calibration, heldout, ridge)
        if len(groups) == 1:
            calibration = calibration.to("cpu")
        else:  # drop this group's moments before the next group's are allocated
            calibration.moments.clear()
    result = scan_result(loaded, rows, calibration, heldout, ridge)
    return result, calibration if len(groups) == 1 else None


def scan_sites(
    loaded: LoadedModel,
    calibration: Calibration,
    heldout: list[Sample],
    ridge: float | None = None,
) -> dict:
    """Fit both direction methods at every calibrated site and measure them on ``heldout``."""
    return scan_result(loaded, site_rows(loaded, calibration, heldout, ridge), calibration, heldout, ridge)


def site_rows(
    loaded: LoadedModel,
    calibration: Calibration,
    heldout: list[Sample],
    ridge: float | None = None,
) -> list[dict]:
    """One scan row per calibrated site: both directions' held-out fit errors."""
    keys = sorted(calibration.moments)
    moments = calibration.moments
    lambdas = {k: ridge if ridge is not None else choose_ridge(moments[k]) for k in keys}
    directions = {k: torch.stack([fit_ridge(moments[k], lambdas[k]), fit_axis(moments[k])]) for k in keys}
    projections = project_inputs(loaded, heldout, directions)
    rows = []
    for site, layer in keys:
        p = projections[(site, layer)]
        ridge_err, axis_err = fit_errors(p, 0), fit_errors(p, 1)
        rows.append(
            {
                "site": site,
                "layer": layer,
                "writers": list(loaded.arch.writers(site, layer)),
                "ridge": {d: e.to_dict() for d, e in ridge_err.items()},
                "axis": {d: e.to_dict() for d, e in axis_err.items()},
                "predicted_kl_ratio": predicted_kl_ratio(ridge_err["all"].rms),
                "ridge_lambda": lambdas[(site, layer)],
                "axis_dim": int(directions[(site, layer)][1].abs().argmax()),
                "outlier_dims": outlier_dimensions(calibration.moments[(site, layer)]),
            }
        )
    return rows


def scan_result(
    loaded: LoadedModel, rows: list[dict], calibration: Calibration, heldout: list[Sample], ridge: float | None
) -> dict:
    rows = sorted(rows, key=lambda r: (r["site"], r["layer"]))
    return {
        "model": loaded.model_id,
        "ridge": "cross-validated" if ridge is None else ridge,
        "calibration": {"tokens": calibration.tokens, "domains": calibration.domains},
        "heldout_domains": sorted({s.domain for s in heldout}),
        "sites": rows,
        "median_axis_over_ridge": _median_ratios(rows),
        "recommended": recommend(rows),
        # Sites behind a post-writer norm (Gemma, OLMo 2): their fit error is of a·h ≈ rms(y), and
        # compiling them needs --approximate (README "Post-writer norms").
        "approximate": {
            site: reason
            for site in sorted({r["site"] for r in rows})
            if (reason := loaded.arch.approximate_reason(site)) is not None
        },
    }


def add_value_routes(
    loaded: LoadedModel,
    result: dict,
    directions: dict[int, torch.Tensor],
    samples: list[Sample],
    heldout: list[Sample],
    ridge: float | None = None,
) -> None:
    """The value route's held-out error (with o_proj for the rest) beside each ``resid_mid`` row of ``result``.

    It depends on the vector (what attention can carry of it), so it needs one: ``directions``
    per layer, coefficient included (the writer's input is shifted in proportion). Rows without a
    value route or a direction are left as they are. Three passes per layer (``routes.fit_value_route``).
    """
    from .calibrate import encode
    from .routes import fit_value_route, has_value_route

    usable = [
        r
        for r in result["sites"]
        if r["site"] == "resid_mid" and r["layer"] in directions and has_value_route(loaded, ("resid_mid", r["layer"]))
    ]
    if not usable:
        return
    calibration, held = encode(loaded, samples), encode(loaded, heldout)
    domains = [s.domain for s in heldout]
    for r in usable:
        key = ("resid_mid", r["layer"])
        fitted = fit_value_route(loaded, key, directions[r["layer"]], calibration, held, domains, ridge)
        error = fitted.heldout_error["all"]
        r["value_route"] = {**fitted.to_dict(), "predicted_kl_ratio": predicted_kl_ratio(error)}


def _median_ratios(rows: list[dict]) -> dict[str, float]:
    out = {}
    for site in sorted({r["site"] for r in rows}):
        ratios = [r["axis"]["all"]["rms"] / r["ridge"]["all"]["rms"] for r in rows if r["site"] == site]
        out[site] = statistics.median(ratios)
    return out


def recommend(rows: list[dict], count: int = RECOMMEND) -> list[dict]:
    """Sites with the lowest held-out ridge error (the worst domain breaks ties)."""

    def worst_domain(r: dict) -> float:
        return max(v["rms"] for d, v in r["ridge"].items() if d != "all")

    ranked = sorted(rows, key=lambda r: (r["ridge"]["all"]["rms"], worst_domain(r)))
    return [
        {"site": r["site"], "layer": r["layer"], "rms": r["ridge"]["all"]["rms"], "worst_domain_rms": worst_domain(r)}
        for r in ranked[:count]
    ]


def site_keys(loaded: LoadedModel, sites: list[str] | None = None, layers: list[int] | None = None) -> list[SiteKey]:
    sites = sites or loaded.arch.fitted_sites()
    for s in sites:
        if loaded.arch.site(s).embedding:
            raise LoraCompileError(f"site {s!r} is exact (an embedding LoRA, nothing fitted): nothing to scan")
    layers = list(range(loaded.num_layers)) if layers is None else layers
    for layer in layers:
        loaded.check_layer(layer)
    return [(s, layer) for s in sites for layer in layers]


def plot_scan(result: dict, path: str | Path) -> Path:
    """Held-out RMS of ``b·x − 1`` by layer: one line per site and direction method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    styles = {"ridge": "-", "axis": ":"}
    colors = {"resid_mid": "tab:blue", "resid_post": "tab:orange"}
    for site in sorted({r["site"] for r in result["sites"]}):
        rows = sorted((r for r in result["sites"] if r["site"] == site), key=lambda r: r["layer"])
        for method in ("ridge", "axis"):
            ax.plot(
                [r["layer"] for r in rows],
                [r[method]["all"]["rms"] for r in rows],
                styles[method],
                color=colors.get(site),
                marker="o" if method == "ridge" else None,
                markersize=3,
                label=f"{site} · {method}",
            )
    routed = sorted((r for r in result["sites"] if "value_route" in r), key=lambda r: r["layer"])
    if routed:
        ax.plot(
            [r["layer"] for r in routed],
            [r["value_route"]["heldout_error"]["all"] for r in routed],
            "--",
            color="tab:green",
            marker="s",
            markersize=3,
            label="resid_mid · value route + o_proj (this vector)",
        )
    for rec in result["recommended"][:1]:
        ax.annotate(
            f"best: {rec['site']} {rec['layer']}",
            (rec["layer"], rec["rms"]),
            xytext=(12, 30),
            textcoords="offset points",
            ha="left",
            fontsize=8,
            arrowprops={"arrowstyle": "->", "lw": 0.8},
        )
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out RMS of b·x − 1  (relative error of the added vector)")
    ax.set_title(f"Constant-direction fit error, {result['model']}", fontsize=10)
    # The KL ratio a compiled adapter is expected to reach is a function of the fit error (fit.py).
    predicted = ax.secondary_yaxis(
        "right", functions=(predicted_kl_ratio, lambda kl: (kl / KL_RATIO_PER_SQUARED_ERROR) ** 0.5)
    )
    predicted.set_ylabel("predicted held-out KL ratio (ridge)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
