"""Post-writer-norm families (Gemma 2, Gemma 3, OLMo 2) on tiny random models: sites, refusal, exactness."""

import json

import pytest
import torch
from conftest import SMOL_VOCAB, _save_tiny
from typer.testing import CliRunner

from lora_compile import api
from lora_compile.cli import app
from lora_compile.fit import fit_post_norm_vector, post_norm_site_error
from lora_compile.models import load_model
from lora_compile.vectors import SteeringVector, save_vector

FAMILIES = ("gemma2", "gemma3_text", "olmo2")


def _config(model_type: str, pad: int, **extra):
    from transformers import Gemma2Config, Gemma3TextConfig, Olmo2Config

    shape = dict(
        vocab_size=SMOL_VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        pad_token_id=pad,
        **extra,
    )
    if model_type == "olmo2":
        return Olmo2Config(**shape)
    cls = Gemma2Config if model_type == "gemma2" else Gemma3TextConfig
    return cls(head_dim=16, sliding_window=64, **shape)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, smol_tokenizer):
    return {
        t: _save_tiny(tmp_path_factory.mktemp(t), _config(t, smol_tokenizer.pad_token_id), smol_tokenizer)
        for t in FAMILIES
    }


def _perturb_norms(loaded, seed=0):
    """Random gains (a fresh model has every gain 1, which would hide a wrong gain convention)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in loaded.model.named_parameters():
        if "layernorm" in name or name.endswith("norm.weight"):
            param.data = (0.3 + torch.rand(param.shape, generator=gen) * 1.2).to(param.dtype)


@pytest.fixture(scope="module")
def families(family_dirs):
    out = {}
    for t, d in family_dirs.items():
        loaded = load_model(d, device="cpu")
        loaded.model.to(torch.float64)  # the site-mapping identities hold to float64 precision
        _perturb_norms(loaded)
        out[t] = loaded
    return out


@pytest.mark.parametrize("model_type", FAMILIES)
def test_hooks_are_what_joins_the_stream(families, model_type):
    """A layer's stream delta is the sum of its two hook outputs; each hook's input is its writer's output."""
    loaded = families[model_type]
    assert loaded.model.config.model_type == model_type
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for layer in range(loaded.num_layers):
        for site in ("resid_mid", "resid_post"):
            hook, (writer,) = loaded.arch.hook_module(site, layer), loaded.arch.writers(site, layer)
            norm = loaded.arch.post_norm(site, layer)
            assert norm == hook
            handles.append(
                loaded.module(hook).register_forward_hook(lambda m, a, o, k=(site, layer): seen.update({k: o}))
            )
            handles.append(
                loaded.module(norm).register_forward_pre_hook(
                    lambda m, a, k=(site, layer): seen.update({("in",) + k: a[0]})
                )
            )
            handles.append(
                loaded.module(writer).register_forward_hook(
                    lambda m, a, o, k=(site, layer): seen.update({("w",) + k: o})
                )
            )
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    try:
        with torch.no_grad():
            states = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    for layer in range(loaded.num_layers - 1):  # the last hidden state is after the final norm
        step = states[layer + 1] - states[layer]
        torch.testing.assert_close(
            step, seen[("resid_mid", layer)] + seen[("resid_post", layer)], rtol=1e-12, atol=1e-12
        )
    for layer in range(loaded.num_layers):
        for site in ("resid_mid", "resid_post"):
            torch.testing.assert_close(seen[("in", site, layer)], seen[("w", site, layer)])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_table_entries(families, model_type):
    arch = families[model_type].arch
    assert arch.site("resid_mid").approximate and arch.site("resid_post").approximate
    assert not arch.site("resid_pre").approximate and arch.approximate_reason("resid_pre") is None
    assert "post_attention_layernorm" in arch.approximate_reason("resid_mid")
    assert (arch.site("resid_pre").embed_scale is not None) == model_type.startswith("gemma")
    assert arch.norm_gain_offset == (1.0 if model_type.startswith("gemma") else 0.0)


def _cli_vector(tmp_path, hidden, site):
    torch.manual_seed(1)
    return str(save_vector(SteeringVector({0: torch.randn(hidden)}, site), tmp_path / "v.safetensors"))


@pytest.mark.parametrize("site", ["resid_mid", "resid_post"])
def test_compile_refuses_without_approximate(family_dirs, tmp_path, site):
    vec = _cli_vector(tmp_path, 32, site)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(
        app, ["compile", "--model", family_dirs["gemma3_text"], "-v", vec, "-o", str(tmp_path / "out")]
    )
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "--approximate" in err and "post-writer norm" in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def _texts(tmp_path):
    cal = tmp_path / "cal.jsonl"
    cal.write_text("\n".join(json.dumps({"text": f"Calibration sentence number {i} about things."}) for i in range(40)))
    held = tmp_path / "held.jsonl"
    held.write_text(
        json.dumps({"domain": "stories", "text": "Once upon a time there was a fox who lived in a wood."})
        + "\n"
        + json.dumps({"domain": "chat", "messages": [{"role": "user", "content": "Tell me a joke."}]})
    )
    return [cal], [held]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_approximate_compile_loads_in_peft_and_verifies(family_dirs, tmp_path, model_type):
    vec = _cli_vector(tmp_path, 32, "resid_mid")
    (cal,), (held,) = _texts(tmp_path)
    out = tmp_path / "adapter"
    args = ["compile", "--model", family_dirs[model_type], "-v", vec, "-o", str(out), "--approximate"]
    result = CliRunner().invoke(app, args + ["--texts", str(cal), "--heldout", str(held), "--coef", "0.1"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "compile_report.json").read_text())
    assert "post-writer norm" in report["approximate"]
    post = report["layers"][0]["post_norm"]
    assert post["module"] == "model.layers.0.post_attention_layernorm"
    assert post["site_error"] <= post["site_error_first_order"]
    check = api.verify_adapter(out, vec, family_dirs[model_type], prompts=[held], generations=0)
    assert check.tokens > 0 and check.kl_unsteered > 0


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_resid_pre_is_exact_with_the_embedding_scale(family_dirs, tmp_path, model_type, bound):
    """PEFT multiplies the embedding LoRA by the embedding's scale (√d): B = s/√d adds s exactly."""
    loaded = load_model(family_dirs[model_type], device="cpu")
    emb = loaded.module("model.embed_tokens")
    assert float(emb.embed_scale) == pytest.approx(32**0.5)
    torch.manual_seed(2)
    steering = SteeringVector({0: 3 * torch.randn(32)}, "resid_pre")
    (cal,), (held,) = _texts(tmp_path)
    compiled = api.compile_adapter(steering, tmp_path / "adapter", loaded, heldout=[held], target="peft")
    assert compiled.report["exact"] and not compiled.report["approximate"]
    check = api.verify_adapter(tmp_path / "adapter", steering, loaded, prompts=[held], generations=0)
    bound("delta_rel_error", check.delta_rel_error, 1e-6)
    bound("delta_rel_error_first", check.delta_rel_error_first, 1e-6)
    bound("kl_ratio", check.kl_ratio, 1e-8)
    # Without the scale the embedding LoRA would add √d·s: the test above could fail.
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    b = tensors["base_model.model.model.embed_tokens.lora_embedding_B"][:, 0]
    a = tensors["base_model.model.model.embed_tokens.lora_embedding_A"][0, 0]
    torch.testing.assert_close(b * a * emb.embed_scale, steering.directions[0], rtol=1e-6, atol=1e-6)


def test_post_norm_vector_reaches_a_reachable_target():
    """Where N(y) + s lies on the norm's reachable set and rms(y) varies, the fitted β hits it exactly."""
    gen = torch.Generator().manual_seed(0)
    d = 24
    e = torch.randn(d, generator=gen, dtype=torch.float64)
    y = (1 + torch.rand(64, 1, generator=gen, dtype=torch.float64)) * e  # one direction, varying RMS
    gain = 0.3 + torch.rand(d, generator=gen, dtype=torch.float64)
    u = e / e.pow(2).mean().sqrt()
    w = u + 0.5 * torch.randn(d, generator=gen, dtype=torch.float64)
    w = w / w.pow(2).mean().sqrt()
    s = gain * (w - u)  # N(y) + s = g·w: reachable
    fit = fit_post_norm_vector(y, gain, 0.0, s)
    assert fit.site_error < 1e-5
    assert float(post_norm_site_error(y, gain, 0.0, s, fit.vector).abs().max()) < 1e-5 * float(s.norm())
    # A generic vector with a near-zero gain: s/g is huge there and shrinks everything through
    # the norm; the fit gives that coordinate up and does far better.
    gain[3] = 1e-3
    generic = 0.3 * torch.randn(d, generator=gen, dtype=torch.float64)
    fit = fit_post_norm_vector(y, gain, 0.0, generic)
    assert fit.site_error < 0.5 * fit.site_error_first_order
    assert fit.site_error <= min(
        float(post_norm_site_error(y, gain, 0.0, generic, generic * gain / (gain**2 + t)).pow(2).sum(-1).mean().sqrt())
        / float(generic.norm())
        for t in (0.0, 0.01, 0.1, 1.0)
    )


def test_planted_structure_compiles_to_true_addition(family_dirs, tmp_path, bound):
    """Gemma 3 with a planted exact structure: compiled resid_mid 0 equals true addition to float precision.

    o_proj is rank 1, ``y = (a·h)·e``, with ``a·h`` kept positive by a value bias on coordinates whose
    weights are zero: ``h/rms(y)`` has an exactly constant direction though ``rms(y)`` varies, the
    normalised output ``u`` is constant, and ``s`` is chosen so ``N(y) + s`` is reachable.
    """
    from transformers import Gemma3TextConfig  # noqa: F401  (the family must exist)

    loaded = load_model(family_dirs["gemma3_text"], device="cpu")
    attn = loaded.module("model.layers.0.self_attn")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        v = attn.v_proj
        v.bias = torch.nn.Parameter(torch.zeros(v.out_features))
        v.weight[0] = 0.0  # value coordinate 0 of the KV head: constant 2.0 for every token
        v.bias[0] = 2.0
        a = torch.zeros(attn.o_proj.in_features, dtype=torch.float64)
        a[0] = a[16] = 1.0  # both query heads share the KV head: h[0] = h[16] = 2
        a[5] = 1.0  # a varying coordinate: a·h = 4 + h[5], |h[5]| small
        e = torch.randn(32, generator=gen, dtype=torch.float64)
        attn.o_proj.weight.copy_((e[:, None] * a[None]).float())
        norm = loaded.module("model.layers.0.post_attention_layernorm")
        norm.weight.copy_(torch.rand(32, generator=gen) - 0.5)
        norm.eps = loaded.model.config.rms_norm_eps = 1e-30
    gain = 1 + norm.weight.detach().double()
    u = e / e.pow(2).mean().sqrt()
    w = u + 0.5 * torch.randn(32, generator=gen, dtype=torch.float64)
    s = gain * (w / w.pow(2).mean().sqrt() - u)
    steering = SteeringVector({0: s.float()}, "resid_mid")
    (cal,), (held,) = _texts(tmp_path)
    compiled = api.compile_adapter(
        steering, tmp_path / "adapter", loaded, texts=[cal], heldout=[held], ridge=1e-10, approximate=True
    )
    post = compiled.report["layers"][0]["post_norm"]
    bound("site_error on calibration", post["site_error"], 1e-5)
    check = api.verify_adapter(tmp_path / "adapter", steering, loaded, prompts=[held], generations=0)
    bound("delta_rel_error", check.delta_rel_error, 1e-4)
    bound("kl_ratio", check.kl_ratio, 1e-6)


def test_scan_maps_post_norm_sites_and_says_they_are_approximate(family_dirs, tmp_path):
    (cal,), (held,) = _texts(tmp_path)
    result = CliRunner().invoke(
        app, ["scan", "--model", family_dirs["olmo2"], "--texts", str(cal), "--heldout", str(held), "-o", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    scan = json.loads((tmp_path / "scan.json").read_text())
    assert sorted(scan["approximate"]) == ["resid_mid", "resid_post"]
    assert {(r["site"], r["layer"]) for r in scan["sites"]} == {(s, k) for s in scan["approximate"] for k in (0, 1)}
    assert "compile needs --approximate" in " ".join(result.output.split())  # the console wraps long lines
