import pytest

from lora_compile.architectures import architecture_for, supported_model_types
from lora_compile.errors import LoraCompileError


def test_llama_family_writers_and_hooks():
    for model_type in ("llama", "mistral", "qwen2", "qwen3"):
        arch = architecture_for(model_type)
        assert arch.writers("resid_mid", 7) == ("model.layers.7.self_attn.o_proj",)
        assert arch.writers("resid_post", 7) == ("model.layers.7.mlp.down_proj",)
        assert arch.hook_module("resid_post", 3) == "model.layers.3.mlp.down_proj"


def test_unsupported_architecture_names_what_is_supported():
    with pytest.raises(LoraCompileError) as err:
        architecture_for("bloom")
    msg = str(err.value)
    assert "bloom" in msg and all(t in msg for t in supported_model_types())
    assert "\n" not in msg


def test_unknown_site_is_refused():
    with pytest.raises(LoraCompileError, match="resid_in"):
        architecture_for("llama").site("resid_in")


def test_resid_pre_is_the_embedding_at_layer_0_only():
    arch = architecture_for("llama")
    assert arch.writers("resid_pre", 0) == ("model.embed_tokens",) == (arch.hook_module("resid_pre", 0),)
    assert arch.site("resid_pre").embedding and not arch.site("resid_mid").embedding
    with pytest.raises(LoraCompileError, match="only at layer"):
        arch.writers("resid_pre", 3)
    assert arch.fitted_sites() == ["resid_post", "resid_mid"]
