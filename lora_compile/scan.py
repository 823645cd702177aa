"""Scan pass: where in this model are constant directions, and how good are they.

For every layer and site: held-out fit error of the ridge and the one-axis
directions (overall, per domain, first token separately), the top outlier
dimensions, and the sites to recommend.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from .calibrate import Calibration, SiteKey, project_inputs
from .corpus import Sample
from .errors import LoraCompileError
from .fit import choose_ridge, fit_axis, fit_errors, fit_ridge, outlier_dimensions
from .models import LoadedModel

RECOMMEND = 3


def scan_sites(
    loaded: LoadedModel,
    calibration: Calibration,
    heldout: list[Sample],
    ridge: float | None = None,
) -> dict:
    """Fit both direction methods at every calibrated site and measure them on ``heldout``."""
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
                "ridge_lambda": lambdas[(site, layer)],
                "axis_dim": int(directions[(site, layer)][1].abs().argmax()),
                "outlier_dims": outlier_dimensions(calibration.moments[(site, layer)]),
            }
        )
    return {
        "model": loaded.model_id,
        "ridge": "cross-validated" if ridge is None else ridge,
        "calibration": {"tokens": calibration.tokens, "domains": calibration.domains},
        "heldout_domains": sorted({s.domain for s in heldout}),
        "sites": rows,
        "median_axis_over_ridge": _median_ratios(rows),
        "recommended": recommend(rows),
    }


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
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
