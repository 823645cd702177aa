"""Multi-layer compiles on the embedded model: sequential calibration against independent.

Steering at layer 8 moves the inputs of the writers at layers 10, 12 and 14; the
sequential compile fits those layers on the inputs the served adapter produces.
"""

import json

import pytest
import torch
from typer.testing import CliRunner

from lora_compile import SteeringVector, compile_adapter, corpus, verify_adapter
from lora_compile.calibrate import calibrate, encode
from lora_compile.cli import app
from lora_compile.extract import extract, read_pairs
from lora_compile.vectors import save_vector
from lora_compile.verify import _lora_deltas, peft_adapter

# Numeric bounds, measured the same under all six CPU kernel variants (README): CI's second run skips them.
pytestmark = [pytest.mark.numeric, pytest.mark.kernel_stable]

LAYERS = [8, 10, 12, 14]
# resid_mid only: where the sequential fit pays off; the resid_post comparison (within 15%,
# dominated by domain shift) is measured by scripts/measure_sequential.py, too slow for the suite.
SITES = ("resid_mid",)
COEF = 4.0


@pytest.fixture(scope="module")
def vector(smol):
    return extract(smol, read_pairs(corpus.demo_pairs_path()), LAYERS)


@pytest.fixture(scope="module")
def compiled(smol, vector, heldout_subset, tmp_path_factory):
    """Per (site, sequential): the vector at that site and the compile result, from one shared calibration."""
    unsteered = calibrate(smol, corpus.default_calibration(), [(s, layer) for s in SITES for layer in LAYERS])
    out = {}
    for site in SITES:
        vec = SteeringVector(vector.directions, site)
        for sequential in (False, True):
            path = tmp_path_factory.mktemp("adapters") / f"{site}-{sequential}"
            result = compile_adapter(
                vec, path, smol, coef=COEF, heldout=heldout_subset, calibration=unsteered, sequential=sequential
            )
            out[site, sequential] = (vec, result)
    return out


@pytest.fixture(scope="module")
def verified(smol, compiled, heldout_subset):
    return {
        key: verify_adapter(result.adapter_dir, vec, smol, prompts=heldout_subset, generations=0)
        for key, (vec, result) in compiled.items()
    }


def _added_vector_errors(loaded, adapter_dir, vec, prompts) -> dict[int, float]:
    """Per layer, RMS over tokens of ‖Δ − coef·s‖ / ‖coef·s‖, Δ what the PEFT-loaded LoRA adds."""
    writers = {layer: loaded.arch.writers(vec.site, layer) for layer in vec.layers}
    errors: dict[int, list[torch.Tensor]] = {layer: [] for layer in vec.layers}
    with peft_adapter(loaded, adapter_dir) as peft_model, torch.no_grad():
        for ids in encode(loaded, prompts):
            with _lora_deltas(peft_model, [w for ws in writers.values() for w in ws]) as deltas:
                peft_model(input_ids=torch.tensor([ids]))
            for layer, ws in writers.items():
                target = COEF * vec.directions[layer].double()
                added = sum(deltas[w][0].double() for w in ws)
                errors[layer].append((added - target).norm(dim=-1) / target.norm())
    return {layer: float(torch.cat(e).pow(2).mean().sqrt()) for layer, e in errors.items()}


@pytest.fixture(scope="module")
def layer_errors(smol, compiled, heldout_subset):
    return {
        key: _added_vector_errors(smol, result.adapter_dir, vec, heldout_subset)
        for key, (vec, result) in compiled.items()
    }


def test_the_report_records_the_mode(compiled):
    for (_, sequential), (_, result) in compiled.items():
        assert result.report["sequential"] is sequential
        assert [x["layer"] for x in result.report["layers"]] == LAYERS


def test_sequential_beats_independent_at_resid_mid(verified, bound):
    # Measured (README, "Multi-layer vectors"): KL ratio 0.71×, chat 0.60×.
    seq, ind = verified["resid_mid", True], verified["resid_mid", False]
    print(
        f"KL ratio {ind.kl_ratio:.4g} → {seq.kl_ratio:.4g}, chat "
        f"{ind.per_domain['chat']['kl_ratio']:.4g} → {seq.per_domain['chat']['kl_ratio']:.4g}, "
        f"top-1 {ind.top1_agreement:.4f} → {seq.top1_agreement:.4f}, "
        f"added-vector error {ind.delta_rel_error:.4g} → {seq.delta_rel_error:.4g}"
    )
    assert seq.kl_unsteered > 0.1  # the steering does something
    bound("sequential / independent KL ratio", seq.kl_ratio / ind.kl_ratio, 0.85)
    bound("sequential / independent added-vector error", seq.delta_rel_error / ind.delta_rel_error, 0.9)
    chat = seq.per_domain["chat"]["kl_ratio"] / ind.per_domain["chat"]["kl_ratio"]
    bound("sequential / independent KL ratio on chat", chat, 0.8)
    assert seq.top1_agreement > ind.top1_agreement


def test_the_first_layer_is_the_same_in_both_modes(layer_errors):
    seq, ind = layer_errors["resid_mid", True], layer_errors["resid_mid", False]
    print({layer: f"{ind[layer]:.4f} → {seq[layer]:.4f}" for layer in LAYERS})
    # The first layer is calibrated on the unsteered model either way: the same direction.
    assert seq[LAYERS[0]] == pytest.approx(ind[LAYERS[0]], rel=1e-6)


def test_reported_fit_errors_are_what_the_served_adapter_adds(compiled, layer_errors):
    # The report measures b·x − 1 under the compiled deltas of every layer, in both modes:
    # it must equal the error of the vector the PEFT-loaded adapter actually adds.
    for key, (_, result) in compiled.items():
        for x in result.report["layers"]:
            assert x["fit_error"]["all"]["rms"] == pytest.approx(layer_errors[key][x["layer"]], rel=1e-3), key


def test_cli_independent_turns_sequential_calibration_off(tiny_dir, tmp_path):
    vec = str(save_vector(SteeringVector({1: torch.randn(64), 2: torch.randn(64)}), tmp_path / "v.safetensors"))
    cal = tmp_path / "cal.jsonl"
    cal.write_text("\n".join(json.dumps({"text": f"Calibration sentence number {i} about things."}) for i in range(20)))
    reports = {}
    for flag in ([], ["--independent"]):
        out = tmp_path / f"adapter{len(flag)}"
        args = ["compile", "-v", vec, "-o", str(out), "--model", tiny_dir, "--texts", str(cal), *flag]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        reports[bool(flag)] = json.loads((out / "compile_report.json").read_text())
    assert reports[False]["sequential"] is True and reports[True]["sequential"] is False
    first = [r["layers"][0]["direction_norm"] for r in reports.values()]
    second = [r["layers"][1]["direction_norm"] for r in reports.values()]
    assert first[0] == pytest.approx(first[1], rel=1e-9) and second[0] != pytest.approx(second[1], rel=1e-6)
