"""The value route into resid_mid: a LoRA on v_proj reaches the site averaged by the attention weights."""

import copy

import torch
from peft import LoraConfig, get_peft_model

from lora_compile.calibrate import Moments, encode, stream_attention_averaged
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
    for batch, mask, z, _ in stream_attention_averaged(loaded, "resid_mid", LAYER, token_lists, batch_tokens=1):
        (i,) = batch
        zt = z[0][mask[0]]
        # The eager kernel's softmax runs in float32 even in a float64 model: agreement to ~1e-7, not 1e-15.
        for actual, predicted in (
            (lora[i][1] - base[i][1], (zt @ a) @ route.per_head.T),  # the site: Σ_h (a·z^h_t) c_h
            (lora[i][0] - base[i][0], route.writer_input_shift(zt, a)),  # the writer's input
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
    for _, mask, z, _ in stream_attention_averaged(loaded, "resid_mid", LAYER, token_lists):
        zt = z[mask]
        add_value_route_moments(moments, zt, route)
        direct += float((((zt @ a) - 1) @ route.per_head.T).pow(2).sum())
    assert abs(squared_error(a, moments) - direct) <= 1e-9 * direct
