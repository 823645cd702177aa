"""The numbers that matter, on the embedded model: compiled adapter vs true addition."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_compile import check_adapter, compile_adapter, corpus, merge_adapter, verify_adapter
from lora_compile.calibrate import calibrate
from lora_compile.extract import extract, read_pairs
from lora_compile.vectors import SteeringVector
from lora_compile.verify import peft_adapter, true_addition

pytestmark = pytest.mark.numeric  # tolerances that depend on CPU kernels: run under two in CI

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


@pytest.mark.kernel_stable
def test_exported_adapters_pass_every_serving_target(smol, compiled):
    for _, result in compiled.values():
        problems = check_adapter(result.adapter_dir, None, smol)
        assert all(p == [] for p in problems.values()), problems


@pytest.mark.kernel_stable
def test_resid_mid_18_is_nearly_exact_on_other_domains(verified, bound):
    report = verified[("resid_mid", 18)]
    bound("KL ratio, resid_mid 18", report.kl_ratio, 1e-4)
    assert "chat" in report.per_domain
    bound("KL ratio on chat, resid_mid 18", report.per_domain["chat"]["kl_ratio"], 1e-4)
    bound("top-1 agreement, resid_mid 18", report.top1_agreement, 0.99, "min")
    assert report.kl_unsteered > 0.1  # the steering does something


@pytest.mark.kernel_stable
def test_layer_10_sites_reach_the_goal(verified, bound):
    # Goal of the issue: ≤ 0.02 at the harder sites on held-out chat prompts.
    for key in (("resid_mid", 10), ("resid_post", 10)):
        bound(f"KL ratio on chat, {key[0]} 10", verified[key].per_domain["chat"]["kl_ratio"], 0.02)


@pytest.mark.kernel_stable
def test_predicted_and_measured_error_agree_in_order_of_magnitude(compiled, verified):
    for key, (_, result) in compiled.items():
        predicted = result.report["predicted_delta_rel_error"]
        measured = verified[key].delta_rel_error
        assert predicted / 3 <= measured <= predicted * 3, (key, predicted, measured)


@pytest.fixture(scope="module")
def value_routed(smol, smol_calibration, smol_vector, heldout_subset, tmp_path_factory):
    """resid_mid 10 compiled with --route auto (v_proj + o_proj where it wins), and its verify report."""
    vec = SteeringVector({10: smol_vector.directions[10]}, "resid_mid")
    path = tmp_path_factory.mktemp("adapters") / "resid-mid-10-auto"
    result = compile_adapter(vec, path, smol, coef=COEF, calibration=smol_calibration, route="auto")
    return result, verify_adapter(path, vec, smol, prompts=heldout_subset, generations=0)


def test_the_value_route_wins_at_resid_mid_10(smol, verified, value_routed, bound):
    """Measured on the full held-out set: KL ratio 0.0096 with o_proj alone, 0.0013 with the value route."""
    result, report = value_routed
    layer = result.report["layers"][0]
    assert layer["route"] == "both" and result.report["target_modules"] == ["o_proj", "v_proj"]
    bound("value route held-out error / o_proj's, resid_mid 10",
          layer["value_route"]["heldout_error"]["all"] / layer["fit_error"]["all"]["rms"], 0.5)  # fmt: skip
    bound("KL ratio with the value route, resid_mid 10", report.kl_ratio, 0.005)
    bound("KL ratio with / without the value route, resid_mid 10",
          report.kl_ratio / verified[("resid_mid", 10)].kl_ratio, 0.35)  # fmt: skip
    # verify reads the added vector at the attention block: it agrees with what compile predicted
    predicted = layer["value_route"]["heldout_error"]["all"]
    assert predicted / 2 <= report.delta_rel_error <= predicted * 2, (predicted, report.delta_rel_error)
    assert all(p == [] for p in check_adapter(result.adapter_dir, None, smol).values())


@pytest.fixture(scope="module")
def next_layered(smol, smol_calibration, smol_vector, heldout_subset, tmp_path_factory):
    """resid_post 10 compiled with --route next_layer (LoRAs in layer 11's attention), and its verify report."""
    vec = SteeringVector({10: smol_vector.directions[10]}, "resid_post")
    path = tmp_path_factory.mktemp("adapters") / "resid-post-10-next"
    result = compile_adapter(
        vec, path, smol, coef=COEF, calibration=smol_calibration, heldout=heldout_subset, route="next_layer"
    )
    return result, verify_adapter(path, vec, smol, prompts=heldout_subset, generations=0)


@pytest.mark.kernel_stable  # 0.0061195 and 0.196398 under default and avx2 (README), far from the bounds
def test_the_next_layer_route_wins_at_resid_post_10(smol, verified, next_layered, bound):
    """Measured on the full held-out set: KL ratio 0.0255 with down_proj, 0.0058 through layer 11."""
    result, report = next_layered
    assert result.report["next_layer"]["writes"] == ["resid_mid", 11]
    assert all(".layers.11.self_attn." in m for m in result.report["layers"][0]["writers"])
    bound("KL ratio through layer 11, resid_post 10", report.kl_ratio, 0.01)
    bound("KL ratio through layer 11 / down_proj's, resid_post 10",
          report.kl_ratio / verified[("resid_post", 10)].kl_ratio, 0.4)  # fmt: skip
    # the compile report measured the same adapter against the same steering on the same text
    assert report.kl_ratio == pytest.approx(result.report["next_layer"]["heldout"]["kl_ratio"], rel=1e-3)
    assert report.delta_rel_error is None
    assert all(p == [] for p in check_adapter(result.adapter_dir, None, smol).values())


def test_predicted_kl_ratio_is_within_a_factor_of_3(compiled, verified, value_routed):
    """The KL ratio predicted from the fit error (fit.predicted_kl_ratio) against the measured one."""
    routed, routed_report = value_routed
    pairs = [(result.report, verified[key]) for key, (_, result) in compiled.items()]
    for report, measured in pairs + [(routed.report, routed_report)]:
        predicted = report["predicted_kl_ratio"]
        assert predicted / 3 <= measured.kl_ratio <= predicted * 3, (report["layers"][0]["layer"], predicted)


@pytest.mark.kernel_stable
def test_greedy_generations_agree_at_resid_mid_18(smol, compiled, heldout_subset):
    vec, result = compiled[("resid_mid", 18)]
    chats = [s for s in heldout_subset if s.is_chat]
    report = verify_adapter(result.adapter_dir, vec, smol, prompts=chats, generations=2, max_new_tokens=16)
    assert len(report.generations) == 2
    for g in report.generations:
        assert g["tokens_agreeing"] == g["tokens"] == 16
        assert g["true"] != g["unsteered"]


def test_true_addition_adds_exactly_at_the_site(smol, smol_vector, bound):
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
    # atol: float32 rounding of a residual stream of norm ~1e3
    bound.close("added vector at resid_mid 18", captured[1] - captured[0], 2.0 * vec.directions[18], 0, 5e-3)


@pytest.fixture(scope="module")
def resid_pre(smol, tmp_path_factory):
    """The layer-0 resid_post happy/sad direction compiled at resid_pre 0 (the embedding output)."""
    direction = extract(smol, read_pairs(corpus.demo_pairs_path()), [0]).directions[0]
    vec = SteeringVector({0: direction}, "resid_pre")
    path = tmp_path_factory.mktemp("adapters") / "resid-pre-0"
    return vec, compile_adapter(vec, path, smol, coef=COEF, target="peft")


@pytest.mark.kernel_stable
def test_resid_pre_is_exact(smol, resid_pre, heldout_subset):
    vec, result = resid_pre
    assert result.report["exact"] and result.report["layers"][0]["fit_error"]["all"]["max"] == 0.0
    assert result.report["target_modules"] == ["embed_tokens"]
    problems = check_adapter(result.adapter_dir)
    assert all(problems[t] == [] for t in ("peft", "vllm", "sglang", "llamacpp")), problems
    assert problems["portable"] and problems["lorax"]  # no embedding LoRA there
    # bfloat16 matmuls are emulated, ~5x slower, on CPUs without native bf16: one prompt per domain there
    # (an exact site is exact on every token; the float32 run covers the whole subset)
    one_per_domain = list({s.domain: s for s in reversed(heldout_subset)}.values())
    for dtype, prompts in (("float32", heldout_subset), ("bfloat16", one_per_domain)):
        report = verify_adapter(result.adapter_dir, vec, smol, prompts=prompts, generations=0, dtype=dtype)
        assert report.dtype == dtype
        assert report.kl_ratio < 1e-6 and report.top1_agreement == 1.0, (dtype, report.kl_ratio)
        assert report.kl_unsteered > 0.05  # the steering does something
    assert smol.dtype == torch.float32  # verifying in bfloat16 used a copy


@pytest.mark.kernel_stable
def test_merged_embedded_model_matches_the_adapter(smol, resid_pre, tmp_path, bound):
    _, result = resid_pre
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(result.adapter_dir, tmp_path / "merged", smol))
    ids = smol.tokenizer(["The weather today is", "I feel"], return_tensors="pt", padding=True)
    with torch.no_grad():
        with peft_adapter(smol, result.adapter_dir) as peft_model:
            expected = peft_model(**ids).logits
        got = merged(**ids).logits
        base = smol.model(**ids).logits
    assert float((expected - base).abs().max()) > 0.1
    bound("max |merged − PEFT| logit, embedded model", (got - expected).abs().max(), 1e-4)
    torch.testing.assert_close(merged.get_output_embeddings().weight, smol.model.get_output_embeddings().weight)


@pytest.fixture(scope="module")
def mid18(smol, smol_vector, tmp_path_factory):
    """resid_mid 18, calibrated at that site only (the same moments as the full calibration's)."""
    calibration = calibrate(smol, corpus.default_calibration(), [("resid_mid", 18)])
    vec = SteeringVector({18: smol_vector.directions[18]}, "resid_mid")
    path = tmp_path_factory.mktemp("adapters") / "mid18"
    return vec, compile_adapter(vec, path, smol, coef=COEF, calibration=calibration)


def test_bfloat16_serving_adds_no_error_beyond_bfloat16_rounding(smol, mid18, heldout_subset, bound):
    vec, result = mid18
    fp32, bf16 = (
        verify_adapter(result.adapter_dir, vec, smol, prompts=heldout_subset, generations=0, dtype=dtype)
        for dtype in ("float32", "bfloat16")
    )
    assert (fp32.dtype, bf16.dtype) == ("float32", "bfloat16") and fp32.kl_dtype_floor is None
    # In bfloat16, true addition itself lands ~1e-3 KL from float32 (rounding of a residual stream of
    # norm ~1e3), far above the adapter's float32 error: the raw bf16-vs-bf16 ratio measures rounding.
    assert bf16.kl_dtype_floor > 10 * fp32.kl_compiled
    assert bf16.kl_ratio > fp32.kl_ratio
    # Judged against float32 true addition, per token and paired, the bf16 adapter adds at most
    # 5e-4 × KL(true‖unsteered) beyond bf16 true addition's own rounding (95% upper bound).
    # Measured (scripts/measure_kernels.py, see README "Served dtype"): excess 1.6e-5 … 1.1e-4 with
    # 1.96·se ≈ 9e-5 across ATEN_CPU_CAPABILITY default/avx2/avx512 × 1/2 threads, so the upper
    # bound spans ≈ 1.1e-4 … 2.1e-4 here; 1.4e-4 (point) was seen on an AVX2-only AMD EPYC.
    bound("bf16 excess KL ratio, 95% upper bound", bf16.kl_excess_ratio + 1.96 * bf16.kl_excess_ratio_se, 5e-4)
    bound("bf16 KL(true fp32‖compiled) / floor", bf16.kl_compiled_vs_float32 / bf16.kl_dtype_floor, 1.25)


def test_true_addition_at_resid_pre_adds_to_hidden_states_0(tiny):
    vec = SteeringVector({0: torch.randn(64)}, "resid_pre")
    ids = torch.tensor([[1, 17, 300, 5]])
    with torch.no_grad():
        before = tiny.model(input_ids=ids, output_hidden_states=True).hidden_states
        with true_addition(tiny, vec, 2.0):
            after = tiny.model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(after[0] - before[0], (2.0 * vec.directions[0]).expand(1, 4, -1), rtol=0, atol=1e-6)
    assert not torch.allclose(after[1], before[1])
