import pytest
import torch

from lora_compile.api import check_adapter
from lora_compile.emit import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    SiteWeights,
    adapter_config,
    adapter_tensors,
    write_adapter,
)
from lora_compile.errors import LoraCompileError
from lora_compile.targets import PROFILES
from lora_compile.verify import peft_adapter


def _steered(tiny, layer=2, site="resid_mid", seed=0):
    g = torch.Generator().manual_seed(seed)
    dim = tiny.module(tiny.arch.writers(site, layer)[0]).in_features
    return SiteWeights(site, layer, torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(64, generator=g))


def _write(tiny, path, steered, force=False, target=PROFILES["portable"]):
    tensors = adapter_tensors(tiny, steered, target)
    shorts = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors})
    return write_adapter(path, tensors, adapter_config(tiny.model_id, shorts, target), {"r": 1}, "# card\n", force)


def test_every_layer_present_zeros_where_not_steering(tiny):
    sw = _steered(tiny)
    tensors = adapter_tensors(tiny, [sw])
    assert len(tensors) == 2 * tiny.num_layers
    for layer in range(tiny.num_layers):
        a = tensors[f"base_model.model.model.layers.{layer}.self_attn.o_proj.lora_A.weight"]
        b = tensors[f"base_model.model.model.layers.{layer}.self_attn.o_proj.lora_B.weight"]
        # portable: rank zero-padded to 4
        assert a.shape == (4, 64) and b.shape == (64, 4) and a.dtype == torch.float32
        assert bool((a == 0).all()) == (layer != 2)
        assert bool((a[1:] == 0).all()) and bool((b[:, 1:] == 0).all())
    a = tensors["base_model.model.model.layers.2.self_attn.o_proj.lora_A.weight"].double()
    b = tensors["base_model.model.model.layers.2.self_attn.o_proj.lora_B.weight"].double()
    assert float(a.norm()) == pytest.approx(float(b.norm()), rel=1e-6)  # balanced for bf16/fp16
    torch.testing.assert_close(b @ a, sw.vector.double()[:, None] @ sw.direction[None], rtol=1e-5, atol=1e-6)


@pytest.mark.numeric
def test_peft_loads_the_adapter_and_reproduces_the_delta(tiny, tmp_path, bound):
    steered = [_steered(tiny, 1, "resid_mid", 1), _steered(tiny, 3, "resid_post", 2)]
    out = _write(tiny, tmp_path / "adapter", steered)
    assert check_adapter(out, "portable", tiny) == {"portable": []}
    for sw in steered:
        writer = tiny.arch.writers(sw.site, sw.layer)[0]
        x = torch.randn(5, tiny.module(writer).in_features)
        base = tiny.module(writer)(x)
        with peft_adapter(tiny, out) as peft_model, torch.no_grad():
            lora_out = peft_model.base_model.model.get_submodule(writer)(x)
        expected = (x.double() @ sw.direction)[:, None] * sw.vector.double()[None]
        bound.close("PEFT LoRA output vs B·A·x", lora_out - base, expected, 1e-4, 1e-5)
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


def test_profile_sets_rank_layers_and_dtype(tiny):
    sw = _steered(tiny)
    vllm = adapter_tensors(tiny, [sw], PROFILES["vllm"], "bfloat16")
    assert sorted(vllm) == [  # only the steered layer: vLLM needs no zero layers
        "base_model.model.model.layers.2.self_attn.o_proj.lora_A.weight",
        "base_model.model.model.layers.2.self_attn.o_proj.lora_B.weight",
    ]
    assert vllm["base_model.model.model.layers.2.self_attn.o_proj.lora_A.weight"].shape == (1, 64)
    assert all(t.dtype == torch.bfloat16 for t in vllm.values())
    config = adapter_config("org/model", ["o_proj"], PROFILES["fireworks"])
    assert config["r"] == config["lora_alpha"] == 4 and config["base_model_name_or_path"] == "org/model"


def test_saved_dtype_overflow_is_an_error(tiny):
    sw = _steered(tiny)
    spike = torch.zeros(64, dtype=torch.float64)
    spike[0] = 1e6
    huge = SiteWeights(sw.site, sw.layer, spike, spike.float())  # balanced: A[0, 0] = B[0, 0] = 1e6 > 65504
    with pytest.raises(LoraCompileError, match="overflows float16"):
        adapter_tensors(tiny, [huge], PROFILES["vllm"], "float16")
    with pytest.raises(LoraCompileError, match="unknown dtype 'float64'"):
        adapter_tensors(tiny, [sw], PROFILES["vllm"], "float64")


def _embedding(loaded, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    vocab = loaded.model.get_input_embeddings().num_embeddings
    return SiteWeights("resid_pre", 0, torch.ones(vocab, dtype=torch.float64), scale * torch.randn(64, generator=g))


def test_resid_pre_is_an_exact_embedding_lora(tiny):
    sw = _embedding(tiny, scale=37.0)
    tensors = adapter_tensors(tiny, [sw], PROFILES["peft"])
    prefix = "base_model.model.model.embed_tokens."
    assert set(tensors) == {prefix + "lora_embedding_A", prefix + "lora_embedding_B"}  # PEFT's keys: no .weight
    a, b = tensors[prefix + "lora_embedding_A"], tensors[prefix + "lora_embedding_B"]
    rank = PROFILES["peft"].rank_for(1)
    assert a.shape == (rank, tiny.model.config.vocab_size) and b.shape == (64, rank)
    assert bool((a[1:] == 0).all()) and bool((b[:, 1:] == 0).all())
    # k is a power of two: B·A[:, t] is s bit for bit, in float32 and after a cast to bfloat16.
    torch.testing.assert_close((b @ a[:, :5]).T, sw.vector.expand(5, -1), rtol=0, atol=0)
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    torch.testing.assert_close((b16 @ a16[:, :2]).T, sw.vector.to(torch.bfloat16).expand(2, -1), rtol=0, atol=0)
    ratio = float(a[0].norm() / b[:, 0].norm())
    assert 0.5 <= ratio <= 2.0  # balanced to within the power of two


@pytest.mark.numeric
def test_peft_embedding_lora_adds_exactly_s_and_leaves_a_tied_head_alone(tiny_tied, tmp_path):
    loaded = tiny_tied
    g = torch.Generator().manual_seed(5)
    sw = SiteWeights("resid_pre", 0, torch.ones(1), 3.0 * torch.randn(32, generator=g))
    peft = PROFILES["peft"]
    tensors = adapter_tensors(loaded, [sw], peft)
    out = write_adapter(
        tmp_path / "a", tensors, adapter_config(loaded.model_id, ["embed_tokens"], peft), {}, "# card\n"
    )
    assert check_adapter(out, "peft", loaded) == {"peft": []}
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
