import pytest
import torch

from lora_compile import corpus
from lora_compile.calibrate import (
    Moments,
    calibrate,
    calibrate_sequential,
    compiled_deltas,
    encode,
    project_inputs,
    self_generate,
)
from lora_compile.corpus import Sample

pytestmark = pytest.mark.numeric  # tolerances that depend on CPU kernels: run under two in CI

TEXTS = [
    Sample("a", text="The quick brown fox jumps over the lazy dog."),
    Sample("a", text="A much longer sentence, so that the batch needs padding at the end of the shorter ones."),
    Sample("b", text="Short."),
    Sample("b", messages=(("user", "Hello there, how are you?"), ("assistant", "Fine, thanks."))),
]
KEYS = [("resid_mid", 1), ("resid_post", 1), ("resid_post", 2)]


def _reference_moments(loaded, samples, key, steer=None):
    """Writer inputs captured one sample at a time (no padding), summed directly.

    ``steer``: (writer, b, v): a plain hook on that writer adds ``(b·x)·v`` meanwhile.
    """
    writer = loaded.arch.writers(*key)[0]
    xs = []
    handles = [loaded.module(writer).register_forward_pre_hook(lambda _m, args: xs.append(args[0][0].double()))]
    if steer is not None:
        other, b, v = steer
        add = lambda _m, args, out: out + (args[0].double() @ b)[..., None].float() * v  # noqa: E731
        handles.append(loaded.module(other).register_forward_hook(add))
    try:
        for ids in encode(loaded, samples):
            with torch.no_grad():
                loaded.model(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    x = torch.cat(xs)
    return x.T @ x, x.sum(0), x.shape[0]


def test_moments_match_direct_computation_and_exclude_padding(tiny):
    cal = calibrate(tiny, TEXTS, KEYS, batch_tokens=4096)
    for key in KEYS:
        gram, total, count = _reference_moments(tiny, TEXTS, key)
        m = cal.moments[key]
        assert m.count == count == cal.tokens
        torch.testing.assert_close(m.total, total, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.gram, gram, rtol=1e-4, atol=1e-5)
    assert cal.domains == {
        "a": sum(len(t) for t in encode(tiny, TEXTS[:2])),
        "b": sum(len(t) for t in encode(tiny, TEXTS[2:])),
    }


def test_moments_are_additive_across_shards(tiny):
    whole = calibrate(tiny, TEXTS, KEYS)
    shards = calibrate(tiny, TEXTS[:2], KEYS) + calibrate(tiny, TEXTS[2:], KEYS)
    for key in KEYS:
        torch.testing.assert_close(shards.moments[key].gram, whole.moments[key].gram, rtol=1e-5, atol=1e-6)
        assert shards.moments[key].count == whole.moments[key].count
    assert shards.tokens == whole.tokens and shards.domains == whole.domains


def test_forward_stops_after_the_deepest_layer_needed(tiny):
    calls = []
    handle = tiny.module("model.layers.2").register_forward_hook(lambda *a: calls.append(1))
    try:
        calibrate(tiny, TEXTS, [("resid_post", 1)])
    finally:
        handle.remove()
    assert calls == []


def test_pinned_prefix_activations_are_recorded(tiny):
    cal = calibrate(tiny, TEXTS, KEYS)
    assert cal.fixed_prefix == tiny.fixed_prefix()
    for m in cal.moments.values():
        assert m.pinned.shape == (len(cal.fixed_prefix), m.dim)


def test_projections_equal_direct_dot_products(tiny):
    cal = calibrate(tiny, TEXTS, KEYS)
    key = ("resid_mid", 1)
    b = torch.randn(2, cal.moments[key].dim, dtype=torch.float64)
    proj = project_inputs(tiny, TEXTS, {key: b})[key]
    assert proj.values.shape == (cal.tokens, 2)
    # Σ_t (b·x_t) = b·μ, and Σ_t (b·x_t)² = bᵀ G b.
    torch.testing.assert_close(proj.values.sum(0), b @ cal.moments[key].total, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        proj.values.pow(2).sum(0), torch.einsum("kd,de,ke->k", b, cal.moments[key].gram, b), rtol=1e-4, atol=1e-4
    )
    assert int((proj.position == 0).sum()) == len(TEXTS)


def test_moments_zero_and_add():
    m = Moments.zeros(3)
    m.add_(torch.ones(4, 3))
    assert m.count == 4 and float(m.gram[0, 1]) == 4.0 and float(m.total[2]) == 4.0


def test_self_generation_is_seeded_and_chat_formatted(tiny):
    prompts = corpus.chat_prompts(corpus.default_calibration())[:4]
    a = self_generate(tiny, prompts, 3, max_new_tokens=5, seed=1)
    b = self_generate(tiny, prompts, 3, max_new_tokens=5, seed=1)
    assert a == b and len(a) == 3
    assert all(s.domain == "self_generated" and s.messages[-1][0] == "assistant" for s in a)


def test_odd_samples_form_the_cross_validation_fold(tiny):
    cal = calibrate(tiny, TEXTS, KEYS)
    odd = calibrate(tiny, TEXTS[1::2], KEYS)
    for key in KEYS:
        fold = cal.moments[key].fold
        assert fold.count == odd.moments[key].count
        torch.testing.assert_close(fold.gram, odd.moments[key].gram, rtol=1e-4, atol=1e-5)


def test_sequential_moments_are_measured_under_the_earlier_layers_delta(tiny):
    first, second = ("resid_mid", 1), ("resid_post", 2)
    torch.manual_seed(1)
    vectors = {first: 5 * torch.randn(64), second: torch.randn(64)}
    fitted = []

    def fit(key, moments):
        fitted.append(key)
        return moments.total / moments.count / (moments.total / moments.count).pow(2).sum()  # b·mean(x) = 1

    cal, directions = calibrate_sequential(tiny, TEXTS, vectors, fit)
    assert fitted == [first, second] and cal.moments.keys() == {first, second}
    unsteered = calibrate(tiny, TEXTS, [first, second])
    torch.testing.assert_close(cal.moments[first].gram, unsteered.moments[first].gram)
    writer = tiny.arch.writers(*first)[0]
    gram, total, count = _reference_moments(tiny, TEXTS, second, (writer, directions[first], vectors[first]))
    m = cal.moments[second]
    assert m.count == count == cal.tokens
    torch.testing.assert_close(m.total, total, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.gram, gram, rtol=1e-4, atol=1e-5)
    # The delta moved the second site's inputs: these are not the unsteered moments.
    assert (m.total - unsteered.moments[second].total).norm() > 1e-2 * total.norm()
    assert m.fold is not None and m.pinned.shape == (len(cal.fixed_prefix), m.dim)


def test_sequential_calibration_uses_a_precomputed_calibration_for_the_first_layer_only(tiny):
    keys = [("resid_post", 1), ("resid_post", 3)]
    precomputed = calibrate(tiny, TEXTS[:2], keys)
    vectors = {k: torch.randn(64) for k in keys}
    cal, _ = calibrate_sequential(tiny, TEXTS, vectors, lambda _k, m: m.total / m.gram.trace(), precomputed)
    assert cal.moments[keys[0]] is precomputed.moments[keys[0]]
    assert cal.moments[keys[1]].count == sum(len(t) for t in encode(tiny, TEXTS)) > precomputed.tokens


def test_compiled_deltas_add_what_the_lora_adds(tiny):
    key = ("resid_post", 2)
    b, v = torch.randn(96, dtype=torch.float64), torch.randn(64)
    writer = tiny.module(tiny.arch.writers(*key)[0])
    x = torch.randn(2, 5, 96)
    with torch.no_grad():
        plain = writer(x)
        with compiled_deltas(tiny, {key: (b, v)}):
            steered = writer(x)
    torch.testing.assert_close(steered - plain, (x.double() @ b)[..., None].float() * v, rtol=1e-4, atol=1e-4)
