"""Every architecture family of the table on a tiny random float64 model built from its config (no download).

Per family: true addition lands where the site says (checked against ``output_hidden_states`` and the
input of the norm before the MLP); with an exactly constant coordinate planted in the writers' inputs
(a zeroed weight row with a bias: that output of the projection is the same for every token) the
compiled adapter, loaded by PEFT, reproduces true addition to float32 precision (the saved adapter's);
the serving-target linter accepts the family's module names. GPT-2: ``fan_in_fan_out`` is needed and
checked. Parallel blocks: the joint fit over both writers beats either writer alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from conftest import SMOL_VOCAB
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    MixtralConfig,
    OPTConfig,
    Phi3Config,
    PhiConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from lora_compile import corpus
from lora_compile.api import check_adapter, compile_adapter, merge_adapter
from lora_compile.architectures import architecture_for, is_transposed, supported_model_types
from lora_compile.calibrate import Moments, calibrate, project_inputs
from lora_compile.errors import LoraCompileError
from lora_compile.fit import fit_error, fit_ridge, squared_error
from lora_compile.models import LoadedModel
from lora_compile.targets import read_adapter
from lora_compile.vectors import SteeringVector
from lora_compile.verify import peft_adapter, true_addition, verify

pytestmark = pytest.mark.numeric  # float64 models, but PEFT's float32 adapters: CPU-kernel dependent bounds

_SMALL = dict(vocab_size=SMOL_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
_GPT = dict(vocab_size=SMOL_VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=512)


@dataclass
class Family:
    """A tiny config, where to plant a constant writer-input coordinate per site, and the norm before the MLP."""

    config: object
    plants: dict[str, list[tuple[str, list[int]]]]  # site -> [(module template, output rows)]
    mid_probe: str | None = None  # the norm whose input is resid_mid (sequential blocks)
    moe: bool = False
    sites: list[str] = field(default_factory=list)


FAMILIES = {
    "phi3": Family(
        Phi3Config(**_SMALL, intermediate_size=48, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0),
        # fused: the value is the last block of qkv_proj; gate and up are the two halves of gate_up_proj
        {
            "resid_mid": [("model.layers.{L}.self_attn.qkv_proj", [-1])],
            "resid_post": [("model.layers.{L}.mlp.gate_up_proj", [47, 95])],
        },
        mid_probe="model.layers.{L}.post_attention_layernorm",
    ),
    "mixtral": Family(
        MixtralConfig(
            **_SMALL, intermediate_size=48, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2
        ),
        {"resid_mid": [("model.layers.{L}.self_attn.v_proj", [-1])]},
        mid_probe="model.layers.{L}.post_attention_layernorm",
        moe=True,
    ),
    "qwen2_moe": Family(
        Qwen2MoeConfig(
            **_SMALL,
            intermediate_size=48,
            num_key_value_heads=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
        ),  # fmt: skip
        {"resid_mid": [("model.layers.{L}.self_attn.v_proj", [-1])]},
        mid_probe="model.layers.{L}.post_attention_layernorm",
        moe=True,
    ),
    "qwen3_moe": Family(
        Qwen3MoeConfig(
            **_SMALL,
            intermediate_size=48,
            num_key_value_heads=2,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=16,
        ),  # fmt: skip
        {"resid_mid": [("model.layers.{L}.self_attn.v_proj", [-1])]},
        mid_probe="model.layers.{L}.post_attention_layernorm",
        moe=True,
    ),
    "gpt2": Family(
        GPT2Config(**_GPT),
        # Conv1D: an output "row" is a column of the [in, out] weight
        {"resid_mid": [("transformer.h.{L}.attn.c_attn", [-1])], "resid_post": [("transformer.h.{L}.mlp.c_fc", [-1])]},
        mid_probe="transformer.h.{L}.ln_2",
    ),
    "gpt_neox": Family(
        GPTNeoXConfig(**_SMALL, intermediate_size=48, use_parallel_residual=True),
        {"resid_post": [("gpt_neox.layers.{L}.mlp.dense_h_to_4h", [-1])]},
    ),
    "gpt_neox_sequential": Family(
        GPTNeoXConfig(**_SMALL, intermediate_size=48, use_parallel_residual=False),
        {
            "resid_mid": [("gpt_neox.layers.{L}.attention.query_key_value", [-1])],
            "resid_post": [("gpt_neox.layers.{L}.mlp.dense_h_to_4h", [-1])],
        },
        mid_probe="gpt_neox.layers.{L}.post_attention_layernorm",
    ),
    "gptj": Family(GPTJConfig(**_GPT, rotary_dim=8), {"resid_post": [("transformer.h.{L}.mlp.fc_in", [-1])]}),
    "phi": Family(PhiConfig(**_SMALL, intermediate_size=48), {"resid_post": [("model.layers.{L}.mlp.fc1", [-1])]}),
    "opt": Family(
        OPTConfig(**_SMALL, ffn_dim=48, word_embed_proj_dim=32, max_position_embeddings=512),
        {
            "resid_mid": [("model.decoder.layers.{L}.self_attn.v_proj", [-1])],
            "resid_post": [("model.decoder.layers.{L}.fc1", [-1])],
        },
        mid_probe="model.decoder.layers.{L}.final_layer_norm",
    ),
    "falcon": Family(
        FalconConfig(**_SMALL, bias=True, parallel_attn=True),
        {"resid_post": [("transformer.h.{L}.mlp.dense_h_to_4h", [-1])]},
    ),
    "falcon_sequential": Family(
        FalconConfig(**_SMALL, bias=True, parallel_attn=False),
        {
            "resid_mid": [("transformer.h.{L}.self_attention.query_key_value", [-1])],
            "resid_post": [("transformer.h.{L}.mlp.dense_h_to_4h", [-1])],
        },
        mid_probe="transformer.h.{L}.post_attention_layernorm",
    ),
}
PLANTED = 0.75  # the planted projection output; every activation maps it to a nonzero constant
NOISE = 0.5  # parallel blocks: the planted row's weights scaled by this, not zeroed (constant + noise)


def _plant(model: nn.Module, template: str, rows: list[int], layer: int) -> None:
    """Make outputs ``rows`` of the projection the same for every token: zero weights, a constant bias."""
    module = model.get_submodule(template.format(L=layer))
    weight = module.weight.data
    out_dim = weight.shape[1] if is_transposed(module) else weight.shape[0]
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(out_dim, dtype=weight.dtype), requires_grad=False)
    for row in rows:
        if is_transposed(module):
            weight[:, row] = 0
        else:
            weight[row] = 0
        module.bias.data[row] = PLANTED


_BUILT: dict[str, LoadedModel] = {}


def _tiny(name: str, tokenizer, plant: bool = True) -> LoadedModel:
    key = f"{name}-{plant}"
    if key not in _BUILT:
        family = FAMILIES[name]
        torch.manual_seed(0)
        extra = {"experts_implementation": "eager"} if family.moe else {}  # grouped_mm has no float64
        model = AutoModelForCausalLM.from_config(family.config, **extra).to(torch.float64).eval()
        model.requires_grad_(False)
        if plant:
            for plants in family.plants.values():
                for template, rows in plants:
                    _plant(model, template, rows, 0)
        arch = architecture_for(family.config.model_type, family.config)
        _BUILT[key] = LoadedModel(model, tokenizer, arch, f"tiny-{name}", f"tiny-{name}")
    return _BUILT[key]


@pytest.fixture(scope="module")
def texts():
    """Real text, kept short: verifying runs the 49k-token head in float64 at every held-out token."""
    calibration = corpus.default_calibration()[:16]
    heldout = [corpus.Sample(s.domain, text=s.text[:300]) for s in corpus.default_heldout() if not s.is_chat][:3]
    return calibration, heldout


def _vector(loaded: LoadedModel, site: str, layer: int = 0, seed: int = 1) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({layer: torch.randn(loaded.hidden_size, generator=g, dtype=torch.float64)}, site)


def _family_sites():
    for name, family in FAMILIES.items():
        arch = architecture_for(family.config.model_type, family.config)
        for site in arch.sites:
            yield name, site


def test_every_family_is_supported_and_unknown_ones_are_refused_by_name():
    for family in FAMILIES.values():
        assert family.config.model_type in supported_model_types()
    with pytest.raises(LoraCompileError) as err:
        architecture_for("bloom")
    assert "bloom" in str(err.value) and all(t in str(err.value) for t in supported_model_types())


def test_config_variants_pick_their_entry():
    par, seq = FAMILIES["falcon"].config, FAMILIES["falcon_sequential"].config
    assert architecture_for("falcon", par).writers("resid_post", 1) == (
        "transformer.h.1.self_attention.dense",
        "transformer.h.1.mlp.dense_4h_to_h",
    )
    assert architecture_for("falcon", seq).writers("resid_post", 1) == ("transformer.h.1.mlp.dense_4h_to_h",)
    new = FalconConfig(**_SMALL, new_decoder_architecture=True, parallel_attn=False)
    assert len(architecture_for("falcon", new).writers("resid_post", 0)) == 2
    with pytest.raises(LoraCompileError, match="no point"):
        architecture_for("gpt_neox", FAMILIES["gpt_neox"].config).site("resid_mid")
    with pytest.raises(LoraCompileError, match="post-LN"):
        architecture_for("opt", OPTConfig(**_SMALL, do_layer_norm_before=False))
    projected = architecture_for("opt", OPTConfig(**_SMALL, word_embed_proj_dim=16))
    with pytest.raises(LoraCompileError, match="project_in"):
        projected.site("resid_pre")
    for model_type in ("mixtral", "qwen2_moe", "qwen3_moe"):
        with pytest.raises(LoraCompileError, match="mixture of experts"):
            architecture_for(model_type).writers("resid_post", 0)


@pytest.mark.parametrize("name,site", list(_family_sites()))
def test_true_addition_lands_at_the_site(name, site, smol_tokenizer):
    """resid_post L = hidden_states[L+1]; resid_pre = hidden_states[0]; resid_mid L = the MLP norm's input."""
    loaded = _tiny(name, smol_tokenizer, plant=False)
    vector = _vector(loaded, site)
    s = vector.directions[0]
    ids = torch.randint(0, SMOL_VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    probe_name = FAMILIES[name].mid_probe
    seen: list[torch.Tensor] = []
    handle = None
    if probe_name is not None:
        probe = loaded.module(probe_name.format(L=0))
        handle = probe.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            plain = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
            with true_addition(loaded, vector):
                steered = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        if handle is not None:
            handle.remove()
    if site == "resid_mid":
        assert probe_name is not None
        torch.testing.assert_close(seen[1] - seen[0], s.expand_as(seen[0]), rtol=0, atol=1e-12)
        torch.testing.assert_close(steered[0], plain[0], rtol=0, atol=0)
    else:
        index = 0 if site == "resid_pre" else 1
        torch.testing.assert_close(steered[index] - plain[index], s.expand_as(plain[index]), rtol=0, atol=1e-12)
        if index:
            torch.testing.assert_close(steered[0], plain[0], rtol=0, atol=0)


@pytest.mark.parametrize("name,site", list(_family_sites()))
def test_compiled_adapter_reproduces_true_addition(name, site, smol_tokenizer, texts, tmp_path, bound):
    """Planted constant coordinate: the fit finds it, PEFT loads the adapter, the delta is exact to float32."""
    loaded = _tiny(name, smol_tokenizer)
    calibration, heldout = texts
    vector = _vector(loaded, site)
    target = "peft" if site == "resid_pre" else "portable"
    result = compile_adapter(
        vector, tmp_path / "adapter", loaded, site=site, direction="axis", texts=calibration, heldout=heldout,
        target=target,
    )  # fmt: skip
    layer = result.report["layers"][0]
    assert layer["writers"] == list(loaded.arch.writers(site, 0))
    bound(f"{name} {site}: held-out RMS of b·x − 1", layer["fit_error"]["all"]["rms"], 1e-12)
    config = read_adapter(tmp_path / "adapter").config
    assert config["fan_in_fan_out"] is loaded.arch.fan_in_fan_out
    report = verify(loaded, tmp_path / "adapter", vector, heldout)
    # The adapter is saved in float32: A and B each round by 2⁻²⁴ relative.
    bound(f"{name} {site}: RMS ‖Δ − s‖/‖s‖", report.delta_rel_error, 1e-6)
    bound(f"{name} {site}: KL ratio", report.kl_ratio, 1e-9)
    assert report.kl_unsteered > 1e-4  # the vector does steer the tiny model
    problems = check_adapter(tmp_path / "adapter", model=loaded)
    assert problems[target] == [] and problems["peft"] == []
    if site != "resid_pre":
        assert problems["lorax"] == [] and problems["tgi"] == []


def test_gpt2_fan_in_fan_out_is_needed(smol_tokenizer, texts, tmp_path, bound):
    """GPT-2's Conv1D writers: the adapter says fan_in_fan_out; the flag flipped is refused and linted.

    ``attn.c_proj`` is square (32 × 32), so a delta merged in the wrong orientation would fit the
    weight's shape and steer something else: shown here, which is why the merge refuses it.
    """
    loaded = _tiny("gpt2", smol_tokenizer)
    calibration, heldout = texts
    vector = _vector(loaded, "resid_mid")
    adapter = tmp_path / "adapter"
    compile_adapter(vector, adapter, loaded, site="resid_mid", direction="axis", texts=calibration, heldout=heldout)
    ids = torch.randint(0, SMOL_VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), true_addition(loaded, vector):
        expected = loaded.model(input_ids=ids).logits
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(adapter, tmp_path / "merged", loaded)).double()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    bound("gpt2 merged vs true addition: max |Δ logit|", (got - expected).abs().max(), 1e-5)
    # The wrong orientation is a different model.
    tensors = read_adapter(adapter).tensors
    key = "base_model.model.transformer.h.0.attn.c_proj"
    delta = tensors[f"{key}.lora_B.weight"].double() @ tensors[f"{key}.lora_A.weight"].double()
    wrong = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").double()
    wrong.get_submodule("transformer.h.0.attn.c_proj").weight.data += delta - delta.T
    with torch.no_grad():
        assert float((wrong(input_ids=ids).logits - expected).abs().max()) > 1e-3
    # Flip the flag: the linter says so, the merge refuses.
    config_path = adapter / "adapter_config.json"
    config_path.write_text(config_path.read_text().replace('"fan_in_fan_out": true', '"fan_in_fan_out": false'))
    problems = check_adapter(adapter, model=loaded)
    assert any("fan_in_fan_out is false" in p and "Conv1D" in p for p in problems["peft"])
    with pytest.raises(LoraCompileError, match="fan_in_fan_out"):
        merge_adapter(adapter, tmp_path / "merged-wrong", loaded)
    with peft_adapter(loaded, adapter):  # PEFT itself corrects the flag (with a warning) when loading
        pass


def test_linter_knows_each_family_s_module_names(smol_tokenizer, texts, tmp_path):
    """A Llama-named module on a GPT-2 base is not a LoRA target there; GPT-2's names are."""
    loaded = _tiny("gpt2", smol_tokenizer)
    calibration, heldout = texts
    compile_adapter(_vector(loaded, "resid_post"), tmp_path / "a", loaded, site="resid_post", texts=calibration,
                    heldout=heldout, direction="axis")  # fmt: skip
    adapter = tmp_path / "a"
    assert check_adapter(adapter, model=loaded)["lorax"] == []
    config_path = adapter / "adapter_config.json"
    config_path.write_text(config_path.read_text().replace('"c_proj"', '"c_proj", "o_proj"'))
    problems = check_adapter(adapter, model=loaded)["lorax"]
    assert any("['o_proj']" in p and "gpt2" in p for p in problems)
    # c_proj names both attn.c_proj and mlp.c_proj: both are present in every layer (zeros where not steering)
    keys = read_adapter(adapter).tensors
    for layer in range(2):
        for part in ("attn", "mlp"):
            assert f"base_model.model.transformer.h.{layer}.{part}.c_proj.lora_A.weight" in keys


@pytest.mark.parametrize("name", ["gpt_neox", "gptj", "phi", "falcon"])
def test_parallel_joint_fit_beats_either_writer(name, smol_tokenizer, texts, bound):
    """Both writers of a parallel block carry a noisy constant coordinate; one ridge over both averages the noise.

    Planted: the value projection's and the MLP input projection's last output each get a bias and
    weights scaled down (``NOISE``), so each writer's input has a coordinate ≈ constant + its own noise.
    On calibration text the joint fit cannot lose (either single fit is one of its candidates); on
    held-out text it need not win, so it is measured on the whole held-out prose set (a few hundred
    tokens gave one family a joint error 10% above its MLP writer's by chance).
    """
    family = FAMILIES[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family.config).to(torch.float64).eval()
    arch = architecture_for(family.config.model_type, family.config)
    attn_writer, mlp_writer = arch.writers("resid_post", 0)
    mlp_in = family.plants["resid_post"][0][0].format(L=0)
    attn_in = {
        "gpt_neox": "gpt_neox.layers.0.attention.query_key_value",
        "gptj": "transformer.h.0.attn.v_proj",
        "phi": "model.layers.0.self_attn.v_proj",
        "falcon": "transformer.h.0.self_attention.query_key_value",
    }[name]
    for path in (attn_in, mlp_in):
        module = model.get_submodule(path)
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros(module.weight.shape[0], dtype=torch.float64), requires_grad=False)
        module.weight.data[-1] *= NOISE
        module.bias.data[-1] = PLANTED
    loaded = LoadedModel(model, smol_tokenizer, arch, f"tiny-{name}", f"tiny-{name}")
    key = ("resid_post", 0)
    moments = calibrate(loaded, corpus.default_calibration()[:32], [key]).moments[key]
    heldout = [s for s in corpus.default_heldout() if not s.is_chat]
    d_attn = loaded.in_features(attn_writer)
    parts = {"attention": slice(0, d_attn), "mlp": slice(d_attn, moments.dim)}
    directions = [fit_ridge(moments)]
    for part in parts.values():
        single = Moments(moments.gram[part, part], moments.total[part], moments.count, moments.pinned[:, part])
        b = torch.zeros(moments.dim, dtype=torch.float64)
        b[part] = fit_ridge(single)
        directions.append(b)
    calibration_rms = [(squared_error(b, moments) / moments.count) ** 0.5 for b in directions]
    assert calibration_rms[0] <= min(calibration_rms[1:])
    projections = project_inputs(loaded, heldout, {key: torch.stack(directions)})[key]
    errors = [fit_error(projections.values[:, k], projections.position).rms for k in range(3)]
    joint, best_single = errors[0], min(errors[1:])
    bound(f"{name}: held-out RMS, joint / better single writer's", joint / best_single, 1.0)
    assert best_single < 0.5  # the planted structure is there for each writer to find
