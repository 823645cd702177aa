"""The next-layer route into resid_post L: LoRAs in layer L+1's attention add v + mean Δ at resid_mid L+1."""

import copy
import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from lora_compile import api
from lora_compile.calibrate import encode
from lora_compile.corpus import Sample, default_calibration
from lora_compile.display import print_compile, print_verify
from lora_compile.errors import LoraCompileError
from lora_compile.refine import RefineOptions
from lora_compile.routes import mean_attention_response, next_layer_steering
from lora_compile.targets import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROFILES
from lora_compile.vectors import SteeringVector
from lora_compile.verify import true_addition

LAYER = 1
HELDOUT = [
    Sample("lake", text="A quiet morning by the lake, with mist over the water."),
    Sample("code", text="def add(a, b):\n    return a + b"),
]


def _post(tiny, layers=(LAYER,), seed=5) -> SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    return SteeringVector({k: torch.randn(tiny.hidden_size, generator=gen) for k in layers}, "resid_post")


def _resid_mid_mean(loaded, layer: int, token_lists, steering: SteeringVector, coef: float) -> torch.Tensor:
    """Mean over every token of the stream entering layer ``layer``'s MLP norm (resid_mid), under ``steering``."""
    seen = []
    norm = loaded.module(f"model.layers.{layer}.post_attention_layernorm")
    handle = norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0]))
    try:
        with torch.no_grad(), true_addition(loaded, steering, coef):
            for tokens in token_lists:
                loaded.model(input_ids=torch.tensor([tokens]), use_cache=False)
    finally:
        handle.remove()
    return torch.cat(seen).mean(0)


def test_the_stand_in_keeps_the_mean_of_resid_mid_at_the_next_layer(tiny):
    """True addition of coef·v at resid_post L and of the stand-in at resid_mid L+1 leave the same
    token-mean of resid_mid L+1: the stand-in adds v + mean Δ where the steered stream has v + Δ_i."""
    loaded = tiny.in_dtype(torch.float64)
    post, coef = _post(loaded), 3.0
    token_lists = encode(loaded, default_calibration()[::16], 48)
    stand_in, report = next_layer_steering(loaded, post, coef, token_lists)
    assert stand_in.site == "resid_mid" and stand_in.layers == [LAYER + 1]
    assert report["writes"] == ["resid_mid", LAYER + 1] and report["mean_response_norm"] > 0
    steered = _resid_mid_mean(loaded, LAYER + 1, token_lists, post, coef)
    standing_in = _resid_mid_mean(loaded, LAYER + 1, token_lists, stand_in, coef)
    # (float64 model, but attention's softmax runs in float32, and Δ's mean comes from padded batches)
    torch.testing.assert_close(standing_in, steered, rtol=0, atol=1e-6 * float(steered.norm()))
    # v alone (attention's response ignored) misses it by the mean response
    plain = _resid_mid_mean(loaded, LAYER + 1, token_lists, SteeringVector({LAYER + 1: post.directions[LAYER]},
                                                                          "resid_mid"), coef)  # fmt: skip
    assert float((plain - steered).norm()) == pytest.approx(report["mean_response_norm"], rel=1e-5)
    zero = mean_attention_response(loaded, ("resid_post", LAYER), torch.zeros(loaded.hidden_size), token_lists)
    assert float(zero.abs().max()) == 0.0


def test_compiled_refined_served_and_verified_against_resid_post(tiny, tmp_path):
    post = _post(tiny)
    options = RefineOptions(steps=4, batch_samples=2, train_samples=4, val_samples=2, max_tokens=32, eval_every=2)
    out = tmp_path / "next"
    compiled = api.compile_adapter(
        post, out, tiny, coef=2.0, texts=default_calibration()[::8], heldout=HELDOUT, route="next_layer",
        refine=True, refine_options=options,
    )  # fmt: skip
    report = compiled.report
    assert report["site"] == "resid_post" and report["next_layer"]["layer"] == LAYER
    assert [x["layer"] for x in report["layers"]] == [LAYER + 1] and report["predicted_kl_ratio"] is None
    assert report["layers"][0]["writers"] == [f"model.layers.{LAYER + 1}.self_attn.o_proj"]
    assert report["next_layer"]["heldout"] == report["refine"]["heldout"]["adapters"]["closed_form"]
    # refinement may add LoRAs on layer L+1's query and key projections (the attention pattern); the tiny
    # model's closed form is already settled (KL ratio 5e-5 on the validation split): they are not in it
    pattern = [f"model.layers.{LAYER + 1}.self_attn.{p}" for p in ("q_proj", "k_proj")]
    assert report["refine"]["pattern_modules"] == pattern and report["refine"]["kept"] == "closed_form"
    assert not {"q_proj", "k_proj"} & set(report["target_modules"])
    # the target's every-layer rule pads other layers with zeros: what adds anything is in layer L+1
    writing = {k.split(".lora_")[0] for k, t in load_file(str(out / ADAPTER_WEIGHTS)).items() if t.any()}
    assert writing and all(f"layers.{LAYER + 1}.self_attn." in m for m in writing), writing
    assert (out / ADAPTER_CONFIG).is_file() and "Next-layer route" in (out / "README.md").read_text()
    assert api.check_adapter(out, model=tiny) == {p: [] for p in PROFILES}
    # verify reads site and layer from the report: a vector with more layers is cut to resid_post L
    wider = SteeringVector({**post.directions, LAYER + 1: torch.ones(tiny.hidden_size)}, "resid_mid")
    checked = api.verify_adapter(out, wider, tiny, prompts=HELDOUT, generations=0)
    assert checked.delta_rel_error is None  # no LoRA at resid_post L's writer: judged by KL
    kept = report["refine"]["heldout"]["adapters"]["refined"]["kl_ratio"]
    assert checked.kl_ratio == pytest.approx(kept, rel=1e-3)


def test_refined_query_key_loras_are_written_and_served(tiny, tmp_path):
    """With sharper attention at layer L+1 (its query and key weights scaled 4x), the vector added at
    resid_post L moves that layer's attention pattern: refinement trains and keeps LoRAs on q_proj and
    k_proj, and the written adapter, loaded by PEFT, reproduces the held-out KL ratio compile measured."""
    sharp = dataclasses.replace(tiny, model=copy.deepcopy(tiny.model))
    with torch.no_grad():
        for proj in ("q_proj", "k_proj"):
            sharp.module(f"model.layers.{LAYER + 1}.self_attn.{proj}").weight.mul_(4.0)
    options = RefineOptions(
        steps=4, batch_samples=2, train_samples=4, val_samples=2, max_tokens=32, eval_every=2, settled_below=None
    )
    post, out = _post(sharp), tmp_path / "sharp"
    report = api.compile_adapter(
        post, out, sharp, coef=2.0, texts=default_calibration()[::8], heldout=HELDOUT, route="next_layer",
        refine=True, refine_options=options,
    ).report  # fmt: skip
    refined = report["refine"]
    assert refined["kept"] == "refined" and {"q_proj", "k_proj"} <= set(report["target_modules"])
    heldout = {k: v["kl_ratio"] for k, v in refined["heldout"]["adapters"].items()}
    assert heldout["refined"] < heldout["closed_form"], heldout
    tensors = load_file(str(out / ADAPTER_WEIGHTS))
    for proj in ("q_proj", "k_proj"):
        trained = [t for k, t in tensors.items() if f"layers.{LAYER + 1}.self_attn.{proj}.lora_B" in k]
        assert len(trained) == 1 and trained[0].any(), proj
    assert api.check_adapter(out, model=sharp) == {p: [] for p in PROFILES}
    checked = api.verify_adapter(out, post, sharp, prompts=HELDOUT, generations=0)
    assert checked.kl_ratio == pytest.approx(heldout["refined"], rel=1e-3)


def test_without_refinement_the_report_measures_the_route_against_resid_post(tiny, tmp_path, capsys):
    post = _post(tiny, seed=6)
    compiled = api.compile_adapter(
        post, tmp_path / "n", tiny, texts=default_calibration()[::8], heldout=HELDOUT, route="next_layer"
    )
    measured = compiled.report["next_layer"]["heldout"]
    checked = api.verify_adapter(tmp_path / "n", post, tiny, prompts=HELDOUT, generations=0)
    assert checked.kl_ratio == pytest.approx(measured["kl_ratio"], rel=1e-3)
    assert set(measured["per_domain"]) == {"lake", "code"}
    print_compile(compiled.report)
    print_verify(checked)
    printed = capsys.readouterr().out
    assert "next-layer route: resid_post 1 written at resid_mid 2" in printed and "not measured" in printed


def test_next_layer_refused_where_it_cannot_be(tiny, tmp_path):
    mid = dataclasses.replace(_post(tiny), site="resid_mid")
    cases = [
        (mid, "not resid_mid"),
        (_post(tiny, layers=(tiny.num_layers - 1,)), "last layer's output"),
        (_post(tiny, layers=(0, 1)), "one layer at a time"),
    ]
    for i, (steering, message) in enumerate(cases):
        with pytest.raises(LoraCompileError, match=message):
            api.compile_adapter(steering, tmp_path / str(i), tiny, route="next_layer")
    assert not any(tmp_path.iterdir())


def test_auto_keeps_the_route_with_the_lower_kl_on_the_validation_split(tiny, tmp_path, capsys):
    """--route auto at resid_post L compiles both routes and keeps the one refinement's validation
    split of the calibration text finds closer to true steering; that adapter is the route's own."""
    post, texts = _post(tiny, seed=7), default_calibration()[::8]
    auto = api.compile_adapter(post, tmp_path / "auto", tiny, coef=2.0, texts=texts, heldout=HELDOUT, route="auto")
    choice = auto.report["route_choice"]
    ratios = choice["validation_kl_ratio"]
    assert set(ratios) == {"writer", "next_layer"} and choice["kept"] == min(ratios, key=ratios.get)
    assert (auto.report["next_layer"] is not None) == (choice["kept"] == "next_layer")
    # each ratio is what refinement would start from: the closed form's KL ratio on that split
    options = RefineOptions(steps=1, eval_every=1, settled_below=None)
    for route in ratios:
        alone = api.compile_adapter(
            post, tmp_path / route, tiny, coef=2.0, texts=texts, heldout=HELDOUT, route=route, refine=True,
            refine_options=options,
        )  # fmt: skip
        assert alone.report["refine"]["kl_ratio_initial"] == pytest.approx(ratios[route], rel=1e-4)
    kept = api.compile_adapter(post, tmp_path / "kept", tiny, coef=2.0, texts=texts, heldout=HELDOUT,
                               route=choice["kept"])  # fmt: skip
    assert (tmp_path / "kept" / ADAPTER_WEIGHTS).read_bytes() == (tmp_path / "auto" / ADAPTER_WEIGHTS).read_bytes()
    print_compile(auto.report)
    assert f"--route auto: kept the {choice['kept'].replace('_', '-')} route" in capsys.readouterr().out
    assert "Route chosen by KL ratio" in (tmp_path / "auto" / "README.md").read_text()
    assert kept.report["route_choice"] is None
