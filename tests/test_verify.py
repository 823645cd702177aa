"""The numbers that matter, on the embedded model: compiled adapter vs true addition."""

import pytest
import torch

from lora_compile import check_adapter, compile_adapter, verify_adapter
from lora_compile.vectors import SteeringVector
from lora_compile.verify import true_addition

COEF = 4.0


@pytest.fixture(scope="module")
def compiled(smol, smol_calibration, smol_vector, tmp_path_factory):
    """Adapters at resid_mid 18, resid_mid 10 and resid_post 10, compiled once."""
    out = {}
    for site, layer in (("resid_mid", 18), ("resid_mid", 10), ("resid_post", 10)):
        vec = SteeringVector({layer: smol_vector.directions[layer]}, site)
        path = tmp_path_factory.mktemp("adapters") / f"{site}-{layer}"
        out[(site, layer)] = (vec, compile_adapter(vec, path, smol, coef=COEF, calibration=smol_calibration))
    return out


@pytest.fixture(scope="module")
def verified(smol, compiled, heldout_subset):
    return {
        key: verify_adapter(result.adapter_dir, vec, smol, prompts=heldout_subset, generations=0)
        for key, (vec, result) in compiled.items()
    }


def test_exported_adapters_pass_every_serving_target(smol, compiled):
    for _, result in compiled.values():
        problems = check_adapter(result.adapter_dir, None, smol)
        assert all(p == [] for p in problems.values()), problems


def test_resid_mid_18_is_nearly_exact_on_other_domains(verified):
    report = verified[("resid_mid", 18)]
    assert report.kl_ratio <= 1e-4, report.kl_ratio
    assert "chat" in report.per_domain and report.per_domain["chat"]["kl_ratio"] <= 1e-4
    assert report.top1_agreement >= 0.99
    assert report.kl_unsteered > 0.1  # the steering does something


def test_layer_10_sites_reach_the_goal(verified):
    # Goal of the issue: ≤ 0.02 at the harder sites on held-out chat prompts.
    for key in (("resid_mid", 10), ("resid_post", 10)):
        assert verified[key].per_domain["chat"]["kl_ratio"] <= 0.02, (key, verified[key].per_domain["chat"])


def test_predicted_and_measured_error_agree_in_order_of_magnitude(compiled, verified):
    for key, (_, result) in compiled.items():
        predicted = result.report["predicted_delta_rel_error"]
        measured = verified[key].delta_rel_error
        assert predicted / 3 <= measured <= predicted * 3, (key, predicted, measured)


def test_greedy_generations_agree_at_resid_mid_18(smol, compiled, heldout_subset):
    vec, result = compiled[("resid_mid", 18)]
    chats = [s for s in heldout_subset if s.is_chat]
    report = verify_adapter(result.adapter_dir, vec, smol, prompts=chats, generations=2, max_new_tokens=16)
    assert len(report.generations) == 2
    for g in report.generations:
        assert g["tokens_agreeing"] == g["tokens"] == 16
        assert g["true"] != g["unsteered"]


def test_true_addition_adds_exactly_at_the_site(smol, smol_vector):
    vec = SteeringVector({18: smol_vector.directions[18]}, "resid_mid")
    ids = smol.tokenizer("Hello world, this is a test.", return_tensors="pt")
    captured = []
    # The residual stream after attention is the input of the post-attention norm.
    norm = smol.module("model.layers.18.post_attention_layernorm")
    h = norm.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    try:
        with torch.no_grad():
            smol.model(**ids)
            with true_addition(smol, vec, 2.0):
                smol.model(**ids)
    finally:
        h.remove()
    torch.testing.assert_close(
        captured[1] - captured[0],
        (2.0 * vec.directions[18]).expand_as(captured[0]),
        rtol=0,
        atol=5e-3,  # float32 rounding of a residual stream of norm ~1e3
    )
