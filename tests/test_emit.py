import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_compile.emit import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    SiteWeights,
    adapter_config,
    adapter_tensors,
    portability_problems,
    write_adapter,
)
from lora_compile.errors import LoraCompileError
from lora_compile.verify import peft_adapter


def _steered(tiny, layer=2, site="resid_mid", seed=0):
    g = torch.Generator().manual_seed(seed)
    dim = tiny.module(tiny.arch.writers(site, layer)[0]).in_features
    return SiteWeights(site, layer, torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(64, generator=g))


def _write(tiny, path, steered, force=False):
    tensors = adapter_tensors(tiny, steered)
    shorts = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors})
    return write_adapter(path, tensors, adapter_config(tiny.model_id, shorts), {"r": 1}, "# card\n", force)


def test_every_layer_present_zeros_where_not_steering(tiny):
    sw = _steered(tiny)
    tensors = adapter_tensors(tiny, [sw])
    assert len(tensors) == 2 * tiny.num_layers
    for layer in range(tiny.num_layers):
        a = tensors[f"base_model.model.model.layers.{layer}.self_attn.o_proj.lora_A.weight"]
        b = tensors[f"base_model.model.model.layers.{layer}.self_attn.o_proj.lora_B.weight"]
        assert a.shape == (1, 64) and b.shape == (64, 1) and a.dtype == torch.float32
        assert bool((a == 0).all()) == (layer != 2)
    a = tensors["base_model.model.model.layers.2.self_attn.o_proj.lora_A.weight"].double()
    b = tensors["base_model.model.model.layers.2.self_attn.o_proj.lora_B.weight"].double()
    assert float(a.norm()) == pytest.approx(float(b.norm()), rel=1e-6)  # balanced for bf16/fp16
    torch.testing.assert_close(b @ a, sw.vector.double()[:, None] @ sw.direction[None], rtol=1e-5, atol=1e-6)


def test_peft_loads_the_adapter_and_reproduces_the_delta(tiny, tmp_path):
    steered = [_steered(tiny, 1, "resid_mid", 1), _steered(tiny, 3, "resid_post", 2)]
    out = _write(tiny, tmp_path / "adapter", steered)
    assert portability_problems(out) == []
    for sw in steered:
        writer = tiny.arch.writers(sw.site, sw.layer)[0]
        x = torch.randn(5, tiny.module(writer).in_features)
        base = tiny.module(writer)(x)
        with peft_adapter(tiny, out) as peft_model, torch.no_grad():
            lora_out = peft_model.base_model.model.get_submodule(writer)(x)
        expected = (x.double() @ sw.direction)[:, None] * sw.vector.double()[None]
        torch.testing.assert_close((lora_out - base).double(), expected, rtol=1e-4, atol=1e-5)
    assert not any("lora" in n for n, _ in tiny.model.named_modules())  # base restored


def test_written_adapter_is_deterministic(tiny, tmp_path):
    a = _write(tiny, tmp_path / "a", [_steered(tiny)])
    b = _write(tiny, tmp_path / "b", [_steered(tiny)])
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, "compile_report.json", "README.md"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_existing_directory_needs_force_and_nothing_is_left_behind(tiny, tmp_path):
    out = _write(tiny, tmp_path / "adapter", [_steered(tiny)])
    with pytest.raises(LoraCompileError, match="already exists"):
        _write(tiny, out, [_steered(tiny, seed=3)])
    _write(tiny, out, [_steered(tiny, seed=3)], force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def _break(adapter, tmp_path, config_edit=None, tensor_edit=None):
    """Copy an adapter with one rule broken."""
    bad = tmp_path / "bad"
    bad.mkdir(exist_ok=True)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(adapter / ADAPTER_WEIGHTS))
    if config_edit:
        config_edit(config)
    if tensor_edit:
        tensor_edit(tensors)
    (bad / ADAPTER_CONFIG).write_text(json.dumps(config))
    save_file(tensors, str(bad / ADAPTER_WEIGHTS))
    return bad


def _drop_layer(tensors):
    for k in [k for k in tensors if ".layers.1." in k]:
        del tensors[k]


@pytest.mark.parametrize(
    "config_edit, tensor_edit, reason",
    [
        (lambda c: c.pop("r"), None, "lacks 'r'"),
        (lambda c: c.pop("target_modules"), None, "lacks 'target_modules'"),
        (lambda c: c.update(lora_bias=True), None, "lora_bias"),
        (lambda c: c.update(use_dora=True), None, "use_dora"),
        (lambda c: c.update(bias="all"), None, "bias is 'all'"),
        (lambda c: c.update(modules_to_save=["lm_head"]), None, "modules_to_save"),
        (lambda c: c.update(r=32, lora_alpha=32), None, "exceeds --max-lora-rank"),
        (lambda c: c.update(lora_alpha=2), None, "lora_alpha != r"),
        (lambda c: c.update(target_modules="o_proj"), None, "not a list"),
        (
            None,
            lambda t: t.update(
                {"base_model.model.model.layers.0.self_attn.o_proj.lora_magnitude_vector": torch.ones(64)}
            ),
            "not a lora_A",
        ),
        (
            None,
            lambda t: t.update(
                {"base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight": torch.full((1, 64), 1e6)}
            ),
            "overflows float16",
        ),
        (lambda c: c.update(target_modules=["q_proj"]), None, "not in target_modules"),
        (None, _drop_layer, "lacks layers [1]"),
    ],
)
def test_portability_rules_each_catch_their_violation(tiny, tmp_path, config_edit, tensor_edit, reason):
    good = _write(tiny, tmp_path / "adapter", [_steered(tiny)])
    problems = portability_problems(_break(good, tmp_path, config_edit, tensor_edit))
    assert any(reason in p for p in problems), problems


def _embedding(loaded, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    vocab = loaded.model.get_input_embeddings().num_embeddings
    return SiteWeights("resid_pre", 0, torch.ones(vocab, dtype=torch.float64), scale * torch.randn(64, generator=g))


def test_resid_pre_is_an_exact_embedding_lora(tiny):
    sw = _embedding(tiny, scale=37.0)
    tensors = adapter_tensors(tiny, [sw], rank=4)
    prefix = "base_model.model.model.embed_tokens."
    assert set(tensors) == {prefix + "lora_embedding_A", prefix + "lora_embedding_B"}  # PEFT's keys: no .weight
    a, b = tensors[prefix + "lora_embedding_A"], tensors[prefix + "lora_embedding_B"]
    assert a.shape == (4, tiny.model.config.vocab_size) and b.shape == (64, 4)
    assert bool((a[1:] == 0).all()) and bool((b[:, 1:] == 0).all())
    # k is a power of two: B·A[:, t] is s bit for bit, in float32 and after a cast to bfloat16.
    torch.testing.assert_close((b @ a[:, :5]).T, sw.vector.expand(5, -1), rtol=0, atol=0)
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    torch.testing.assert_close((b16 @ a16[:, :2]).T, sw.vector.to(torch.bfloat16).expand(2, -1), rtol=0, atol=0)
    ratio = float(a[0].norm() / b[:, 0].norm())
    assert 0.5 <= ratio <= 2.0  # balanced to within the power of two


def test_peft_embedding_lora_adds_exactly_s_and_leaves_a_tied_head_alone(tiny_tied, tmp_path):
    loaded = tiny_tied
    g = torch.Generator().manual_seed(5)
    sw = SiteWeights("resid_pre", 0, torch.ones(1), 3.0 * torch.randn(32, generator=g))
    tensors = adapter_tensors(loaded, [sw])
    out = write_adapter(tmp_path / "a", tensors, adapter_config(loaded.model_id, ["embed_tokens"]), {}, "# card\n")
    assert portability_problems(out) == []
    ids = torch.tensor([[1, 5, 900, 49151]])
    hidden = torch.randn(1, 4, 32, generator=g)
    with torch.no_grad():
        base_embed = loaded.model.get_input_embeddings()(ids)
        base_head = loaded.model.get_output_embeddings()(hidden)
        with peft_adapter(loaded, out) as peft_model:
            inner = peft_model.base_model.model
            embed = inner.get_input_embeddings()(ids)
            head = inner.get_output_embeddings()(hidden)
            assert "lora" not in type(inner.get_output_embeddings()).__module__
    torch.testing.assert_close(embed, base_embed + sw.vector, rtol=0, atol=0)
    torch.testing.assert_close(head, base_head, rtol=0, atol=0)
    assert loaded.model.get_output_embeddings().weight is loaded.model.get_input_embeddings().weight
