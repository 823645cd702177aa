"""Scan on the embedded model: the ridge direction against the one-axis baseline."""

import json

import pytest

from lora_compile import corpus, scan
from lora_compile.scan import plot_scan, recommend

# Numeric bounds, measured the same under all six CPU kernel variants (README): CI's second run skips them.
pytestmark = [pytest.mark.numeric, pytest.mark.kernel_stable]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("scan")


@pytest.fixture(scope="module")
def result(smol, smol_calibration, outputs):
    out, _ = scan(smol, calibration=smol_calibration, out_json=outputs / "scan.json", out_png=outputs / "scan.png")
    return out


def test_every_site_and_layer_is_scanned(smol, result):
    assert len(result["sites"]) == 2 * smol.num_layers
    row = result["sites"][0]
    assert {"ridge", "axis", "outlier_dims", "writers"} <= row.keys()
    held_domains = {s.domain for s in corpus.default_heldout()}
    assert set(row["ridge"]) == held_domains | {"all"}


def test_ridge_beats_the_one_axis_baseline(result, bound):
    ratios = result["median_axis_over_ridge"]
    bound("median axis/ridge error, resid_mid", ratios["resid_mid"], 5, "min")
    bound("median axis/ridge error, resid_post", ratios["resid_post"], 3, "min")


def test_recommendation_is_the_best_site(result):
    best = result["recommended"][0]
    assert (best["site"], best["layer"]) == ("resid_mid", 18)
    assert best["rms"] == min(r["ridge"]["all"]["rms"] for r in result["sites"])
    assert recommend(result["sites"], 1) == result["recommended"][:1]


def test_scan_outputs_json_and_png(result, outputs, tmp_path):
    assert json.loads((outputs / "scan.json").read_text())["recommended"] == result["recommended"]
    assert (outputs / "scan.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_scan(result, tmp_path / "again.png").stat().st_size > 10_000
