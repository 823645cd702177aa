"""The value route into resid_mid: a LoRA on v_proj reaches the site averaged by the attention weights."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lora_compile.calibrate import Moments, encode, stream_attention
from lora_compile.corpus import Sample
from lora_compile.fit import add_value_route_moments, squared_error, value_route

LAYER = 1
TEXTS = ["The fox ran over the hill and far away.", "Numbers: 3, 1, 4, 1, 5, 9, 2, 6."]


def _writer_io(model, module: str, token_lists) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``module``'s (input, output), one sample at a time: its output is what it adds to the stream."""
    seen = []
    hook = model.get_submodule(module).register_forward_hook(lambda _m, a, out: seen.append((a[0][0], out[0])))
    try:
        with torch.no_grad():
            for tokens in token_lists:
                model(input_ids=torch.tensor([tokens]), use_cache=False)
    finally:
        hook.remove()
    return seen


def test_a_value_lora_adds_the_attention_averaged_projection_exactly(tiny):
    loaded = tiny.in_dtype(torch.float64)
    attention, values = loaded.arch.attention_route("resid_mid", LAYER)
    writer = loaded.arch.writers("resid_mid", LAYER)[0]
    gen = torch.Generator().manual_seed(0)
    vector = torch.randn(loaded.hidden_size, generator=gen, dtype=torch.float64)
    route = value_route(loaded.module(writer).weight, loaded.attention_shape, vector)
    # The split is exact: reachable part + rest = vector, the rest orthogonal to what is reachable.
    reach = route.per_head.sum(1)
    assert torch.allclose(reach + route.rest, vector, atol=1e-12)
    assert abs(float(reach @ route.rest)) < 1e-10 * float(vector @ vector)
    heads, kv, head_dim = loaded.attention_shape
    assert route.values_b.shape == (kv * head_dim,) and 0 < route.reached < 1

    a = torch.randn(loaded.hidden_size, generator=gen, dtype=torch.float64) / loaded.hidden_size**0.5
    steered = get_peft_model(copy.deepcopy(loaded.model), LoraConfig(r=1, lora_alpha=1, target_modules=[values]))
    lora = steered.base_model.model.get_submodule(values)
    lora.lora_A["default"].weight.data = a[None].clone()
    lora.lora_B["default"].weight.data = route.values_b[:, None].clone()

    samples = [Sample("test", text=t) for t in TEXTS]
    token_lists = encode(loaded, samples)
    base = _writer_io(loaded.model, writer, token_lists)
    lora = _writer_io(steered.base_model.model, writer, token_lists)
    for batch, mask, seen in stream_attention(loaded, "resid_mid", LAYER, token_lists, batch_tokens=1):
        (i,) = batch
        zt = seen.averaged(0, mask)
        assert torch.allclose(seen.averaged_along(0, mask, a), zt @ a, rtol=1e-12, atol=1e-12)
        # The eager kernel's softmax runs in float32 even in a float64 model: agreement to ~1e-7, not 1e-15.
        for actual, predicted in (
            (lora[i][1] - base[i][1], (zt @ a) @ route.per_head.T),  # the site: Σ_h (a·z^h_t) c_h
            (lora[i][0] - base[i][0], route.writer_input_shift(zt @ a)),  # the writer's input
        ):
            error = float((actual - predicted).abs().max() / actual.abs().max())
            assert error < 1e-6, (i, error)


def test_value_route_moments_give_the_exact_squared_error(tiny):
    loaded = tiny.in_dtype(torch.float64)
    writer = loaded.arch.writers("resid_mid", LAYER)[0]
    gen = torch.Generator().manual_seed(1)
    route = value_route(
        loaded.module(writer).weight,
        loaded.attention_shape,
        torch.randn(loaded.hidden_size, generator=gen, dtype=torch.float64),
    )
    token_lists = encode(loaded, [Sample("test", text=t) for t in TEXTS])
    moments = Moments.zeros(loaded.hidden_size)
    a = torch.randn(loaded.hidden_size, generator=gen, dtype=torch.float64)
    direct = 0.0
    for batch, mask, seen in stream_attention(loaded, "resid_mid", LAYER, token_lists):
        for row in range(len(batch)):
            zt = seen.averaged(row, mask)
            add_value_route_moments(moments, zt, route)
            direct += float((((zt @ a) - 1) @ route.per_head.T).pow(2).sum())
    assert abs(squared_error(a, moments) - direct) <= 1e-9 * direct


def _calibration() -> list[Sample]:
    """A slice of the shipped calibration text, every domain (enough for a tiny model's fit)."""
    from lora_compile.corpus import default_calibration

    return default_calibration()[::8]


HELDOUT = [
    "A quiet morning by the lake, with mist over the water.",
    "def add(a, b):\n    return a + b",
    "The committee will meet again on Thursday to vote.",
]


def test_compile_with_the_value_route_adds_what_its_report_says(tiny, tmp_path):
    """route="both": a LoRA on v_proj and one on o_proj; PEFT-loaded, what they add at resid_mid
    (verify runs the attention block with and without them) has the held-out error compile reported."""
    from safetensors.torch import load_file

    from lora_compile import api
    from lora_compile.vectors import SteeringVector

    loaded = tiny.in_dtype(torch.float64)
    gen = torch.Generator().manual_seed(2)
    steering = SteeringVector({LAYER: torch.randn(loaded.hidden_size, generator=gen)}, "resid_mid")
    held = [Sample("held", text=t) for t in HELDOUT]
    out = tmp_path / "both"
    compiled = api.compile_adapter(
        steering, out, loaded, coef=2.0, texts=_calibration(), heldout=held, target="peft", dtype="float32",
        route="both",
    )  # fmt: skip
    layer = compiled.report["layers"][0]
    values = loaded.arch.attention_route("resid_mid", LAYER)[1]
    assert layer["route"] == "both" and layer["value_route"]["kept"]
    assert layer["value_route"]["values_module"] == values
    assert compiled.report["target_modules"] == ["o_proj", "v_proj"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert float(tensors[f"base_model.model.{values}.lora_B.weight"].norm()) > 0
    assert api.check_adapter(out, "peft", model=loaded) == {"peft": []}
    # every serving target takes LoRA on v_proj (this peft-shaped adapter breaks others' rank and
    # every-layer rules, which their own --target shapes satisfy)
    problems = api.check_adapter(out, model=loaded)
    assert len(problems) > 2 and not [p for ps in problems.values() for p in ps if "LoRA targets" in p], problems

    check = api.verify_adapter(out, steering, loaded, coef=2.0, prompts=held, generations=0)
    first, rest = len(held), check.tokens - len(held)
    measured = ((check.delta_rel_error**2 * rest + check.delta_rel_error_first**2 * first) / check.tokens) ** 0.5
    reported = layer["value_route"]["heldout_error"]["all"]
    assert layer["value_route"]["tokens"] == check.tokens
    # The adapter is saved in float32 and the eager softmax runs in float32: agreement to ~1e-6.
    assert abs(measured - reported) <= 1e-4 * reported, (measured, reported)
    assert compiled.report["predicted_delta_rel_error"] == reported


def test_route_auto_keeps_the_value_route_only_where_it_wins(tiny, tmp_path):
    from lora_compile import api
    from lora_compile.vectors import SteeringVector

    gen = torch.Generator().manual_seed(3)
    steering = SteeringVector({k: torch.randn(tiny.hidden_size, generator=gen) for k in (1, 2)}, "resid_mid")
    held = [Sample("held", text=t) for t in HELDOUT]
    compiled = api.compile_adapter(
        steering, tmp_path / "auto", tiny, texts=_calibration(), heldout=held, target="peft", sequential=False,
        route="auto",
    )  # fmt: skip
    for layer in compiled.report["layers"]:
        route, writer_error = layer["value_route"], layer["fit_error"]["all"]["rms"]
        assert route["kept"] == (route["heldout_error"]["all"] < writer_error)
        assert layer["route"] == ("both" if route["kept"] else "writer")


def test_routes_refused_where_they_cannot_be(tiny, tmp_path):
    from lora_compile import api
    from lora_compile.errors import LoraCompileError
    from lora_compile.vectors import SteeringVector

    post = SteeringVector({1: torch.ones(tiny.hidden_size)}, "resid_post")
    with pytest.raises(LoraCompileError, match="--route both: .*not written by attention"):
        api.compile_adapter(post, tmp_path / "a", tiny, route="both")
    two = SteeringVector({1: torch.ones(tiny.hidden_size), 2: torch.ones(tiny.hidden_size)}, "resid_mid")
    with pytest.raises(LoraCompileError, match="--independent"):
        api.compile_adapter(two, tmp_path / "b", tiny, route="auto")
    with pytest.raises(LoraCompileError, match="unknown route"):
        api.compile_adapter(post, tmp_path / "c", tiny, route="values")
    assert not any(tmp_path.iterdir())
    # auto at a site without a value route (nor a next layer to write it through) compiles the writer's LoRA alone
    held = [Sample("held", text=t) for t in HELDOUT]
    last = SteeringVector({tiny.num_layers - 1: torch.ones(tiny.hidden_size)}, "resid_post")
    compiled = api.compile_adapter(last, tmp_path / "d", tiny, texts=_calibration(), heldout=held, route="auto")
    assert compiled.report["layers"][0]["route"] == "writer" and "value_route" not in compiled.report["layers"][0]
    assert compiled.report["route_choice"] is None and compiled.report["next_layer"] is None


def test_scan_with_a_vector_shows_the_value_route_compile_would_fit(tiny, tmp_path):
    from lora_compile import api
    from lora_compile.vectors import SteeringVector

    gen = torch.Generator().manual_seed(4)
    steering = SteeringVector({LAYER: torch.randn(tiny.hidden_size, generator=gen)}, "resid_mid")
    held = [Sample("held", text=t) for t in HELDOUT]
    result, _ = api.scan(
        tiny, sites=["resid_mid", "resid_post"], layers=[LAYER, LAYER + 1], texts=_calibration(), heldout=held,
        vector=steering, coef=3.0, out_json=tmp_path / "scan.json", out_png=tmp_path / "scan.png",
    )  # fmt: skip
    routed = {(r["site"], r["layer"]): r["value_route"] for r in result["sites"] if "value_route" in r}
    assert list(routed) == [("resid_mid", LAYER)]  # only resid_mid, only the vector's layers
    assert (tmp_path / "scan.png").stat().st_size > 0
    assert all(r["predicted_kl_ratio"] > 0 for r in result["sites"])
    compiled = api.compile_adapter(
        steering, tmp_path / "adapter", tiny, coef=3.0, texts=_calibration(), heldout=held, route="both"
    )
    # Same vector, coefficient, texts and held-out text: scan's numbers are compile's.
    assert routed[("resid_mid", LAYER)]["heldout_error"]["all"] == pytest.approx(
        compiled.report["layers"][0]["value_route"]["heldout_error"]["all"], rel=1e-9
    )
