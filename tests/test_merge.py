"""Merged export: the merged model's logits equal the PEFT-loaded adapter's, tied embeddings untied."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_compile import merge_adapter
from lora_compile.emit import ADAPTER_CONFIG, SiteWeights, adapter_config, adapter_tensors, write_adapter
from lora_compile.errors import LoraCompileError
from lora_compile.targets import PROFILES
from lora_compile.verify import peft_adapter

pytestmark = pytest.mark.numeric  # tolerances that depend on CPU kernels: run under two in CI


def _adapter(loaded, path, sites, scale=3.0, config_edit=None):
    """An adapter with random steering at ``sites`` [(site, layer)] of a tiny model."""
    g = torch.Generator().manual_seed(len(sites))
    steered = []
    for site, layer in sites:
        writer = loaded.module(loaded.arch.writers(site, layer)[0])
        dim = getattr(writer, "in_features", None) or writer.num_embeddings
        b = torch.randn(dim, generator=g, dtype=torch.float64) / dim
        steered.append(SiteWeights(site, layer, b, scale * torch.randn(loaded.hidden_size, generator=g)))
    peft = PROFILES["peft"]  # a target that takes embedding LoRA
    tensors = adapter_tensors(loaded, steered, peft)
    config = adapter_config(loaded.model_id, sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors}), peft)
    if config_edit:
        config_edit(config)
    return write_adapter(path, tensors, config, {}, "# card\n")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))


def test_merged_tied_model_matches_the_peft_adapter(tiny_tied, tmp_path, ids, bound):
    sites = [("resid_pre", 0), ("resid_mid", 1), ("resid_post", 0)]
    adapter = _adapter(tiny_tied, tmp_path / "adapter", sites, config_edit=lambda c: c.update(lora_alpha=2))
    merged_dir = merge_adapter(adapter, tmp_path / "merged", tiny_tied)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    with peft_adapter(tiny_tied, adapter) as peft_model:
        expected = _logits(peft_model, ids)
    base = _logits(tiny_tied.model, ids)
    got = _logits(merged, ids)
    assert float((expected - base).abs().max()) > 0.1  # the adapter (scaling 2) changes the logits
    bound("max |merged − PEFT| logit, tiny tied", (got - expected).abs().max(), 1e-5)
    # The head kept the original weight; the embedding took the delta; the config says untied.
    assert json.loads((merged_dir / "config.json").read_text())["tie_word_embeddings"] is False
    assert merged.get_output_embeddings().weight is not merged.get_input_embeddings().weight
    torch.testing.assert_close(merged.get_output_embeddings().weight, tiny_tied.model.get_output_embeddings().weight)
    # The loaded model is untouched and still tied.
    assert tiny_tied.model.get_output_embeddings().weight is tiny_tied.model.get_input_embeddings().weight
    torch.testing.assert_close(_logits(tiny_tied.model, ids), base, rtol=0, atol=0)
    assert (merged_dir / "tokenizer.json").is_file() and (merged_dir / "model.safetensors").is_file()


def test_untied_model_and_linear_only_adapter(tiny, tmp_path, ids, bound):
    adapter = _adapter(tiny, tmp_path / "adapter", [("resid_mid", 2)])
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(adapter, tmp_path / "merged", tiny))
    with peft_adapter(tiny, adapter) as peft_model:
        expected = _logits(peft_model, ids)
    bound("max |merged − PEFT| logit, tiny", (_logits(merged, ids) - expected).abs().max(), 1e-5)


def test_merge_is_deterministic_and_atomic(tiny_tied, tmp_path):
    adapter = _adapter(tiny_tied, tmp_path / "adapter", [("resid_pre", 0)])
    a = merge_adapter(adapter, tmp_path / "a", tiny_tied)
    b = merge_adapter(adapter, tmp_path / "b", tiny_tied)
    for f in sorted(p.name for p in a.iterdir()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    with pytest.raises(LoraCompileError, match="already exists"):
        merge_adapter(adapter, a, tiny_tied)
    merge_adapter(adapter, a, tiny_tied, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "adapter", "b"]


def test_bad_adapters_are_refused(tiny, tiny_tied, tmp_path):
    with pytest.raises(LoraCompileError, match="not an adapter directory"):
        merge_adapter(tmp_path, tmp_path / "m", tiny)
    adapter = _adapter(tiny, tmp_path / "adapter", [("resid_mid", 2)])
    with pytest.raises(LoraCompileError, match="wrong base model"):
        merge_adapter(adapter, tmp_path / "m", tiny_tied)  # d=64 adapter on a d=32 model
    cfg = json.loads((adapter / ADAPTER_CONFIG).read_text())
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(LoraCompileError, match="DoRA"):
        merge_adapter(adapter, tmp_path / "m", tiny)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
