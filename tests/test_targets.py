"""Serving targets: every profile's adapter passes its own lint and loads in PEFT; every rule catches its breach."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lora_compile import check_adapter, compile_adapter, corpus
from lora_compile.calibrate import calibrate
from lora_compile.cli import app
from lora_compile.emit import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    SiteWeights,
    adapter_config,
    adapter_tensors,
    write_adapter,
)
from lora_compile.errors import LoraCompileError
from lora_compile.fit import choose_ridge, fit_direction
from lora_compile.models import DEFAULT_MODEL_ID
from lora_compile.targets import PROFILES, profile, scale
from lora_compile.vectors import SteeringVector
from lora_compile.verify import peft_adapter

runner = CliRunner()
KEY = "resid_mid", 18
COEF = 4.0
O_PROJ = "base_model.model.model.layers.{L}.self_attn.o_proj.lora_{X}.weight"
EMBED = "base_model.model.model.embed_tokens.lora_embedding_{X}"


# ---- the profile table ----


def test_rank_is_zero_padded_to_the_target_minimum_and_capped():
    assert PROFILES["portable"].rank_for(1) == 4 and PROFILES["fireworks"].rank_for(1) == 4
    assert PROFILES["vllm"].rank_for(1) == 1
    with pytest.raises(LoraCompileError, match="--max-lora-rank"):
        PROFILES["vllm"].rank_for(32)


@pytest.mark.parametrize("name", list(PROFILES))
def test_layer0_site_needs_embedding_lora(name):
    prof = PROFILES[name]
    prof.check_site("resid_mid")
    if prof.embedding_lora:
        prof.check_site("resid_pre")
        return
    with pytest.raises(LoraCompileError, match="does not accept embedding LoRA") as err:
        prof.check_site("resid_pre")
    # names exactly the targets that do
    assert "peft / vllm / sglang / llamacpp" in str(err.value)
    assert not any(f" {n} " in str(err.value) for n in ("lorax", "tgi", "fireworks"))


def test_embedding_lora_support_matches_the_servers():
    assert {n for n, p in PROFILES.items() if p.embedding_lora} == {"peft", "vllm", "sglang", "llamacpp"}


def test_bad_target_name_lists_the_targets(tmp_path):
    with pytest.raises(LoraCompileError, match="unknown target 'nope': use one of portable, peft, vllm"):
        profile("nope")
    result = runner.invoke(app, ["check", str(tmp_path), "--target", "nope"])
    err = result.stderr.strip()
    assert result.exit_code == 2 and len(err.splitlines()) == 1 and "llamacpp" in err, err


# ---- every profile on the embedded model ----


@pytest.fixture(scope="module")
def calibration(smol):
    """Only the site the adapters need (the full smol_calibration covers every site)."""
    return calibrate(smol, corpus.default_calibration()[:60], [KEY])


@pytest.fixture(scope="module")
def vector(smol_vector):
    return SteeringVector({KEY[1]: smol_vector.directions[KEY[1]]}, KEY[0])


CASES = [(name, None) for name in PROFILES] + [("vllm", "bfloat16"), ("llamacpp", "float16")]


@pytest.mark.numeric
@pytest.mark.parametrize("target, dtype", CASES, ids=[f"{t}-{d or 'default'}" for t, d in CASES])
def test_compiled_adapter_passes_its_target_and_reproduces_the_delta(
    smol, calibration, vector, heldout_subset, tmp_path, target, dtype
):
    prof = PROFILES[target]
    result = compile_adapter(
        vector,
        tmp_path / "a",
        smol,
        coef=COEF,
        calibration=calibration,
        heldout=heldout_subset[:4],
        target=target,
        dtype=dtype,
    )
    out = result.adapter_dir
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(out / ADAPTER_WEIGHTS))
    assert config["base_model_name_or_path"] == DEFAULT_MODEL_ID and result.report["warnings"] == []
    assert config["r"] == config["lora_alpha"] == prof.rank_for(1) == result.report["rank"]
    saved = {str(t.dtype) for t in tensors.values()}
    assert saved == {f"torch.{dtype or prof.default_dtype}"}
    assert len(tensors) == 2 * (smol.num_layers if prof.every_layer else 1)
    assert check_adapter(out, target, smol) == {target: []}

    # PEFT loads it, and the LoRA adds (b·x)·s on random inputs
    key = KEY
    b = fit_direction(calibration.moments[key], "ridge", choose_ridge(calibration.moments[key]))
    s = COEF * vector.directions[key[1]].double()
    writer = smol.arch.writers(*key)[0]
    x = torch.randn(6, smol.module(writer).in_features) * 3
    with torch.no_grad():
        base = smol.module(writer)(x)
        with peft_adapter(smol, out) as peft_model:
            lora_out = peft_model.base_model.model.get_submodule(writer)(x)
    expected = (x.double() @ b)[:, None] * s[None]
    tol = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-3}[dtype or prof.default_dtype]
    err = float(((lora_out - base).double() - expected).norm() / expected.norm())
    assert err < tol, err
    assert scale(config) == 1.0


def test_linter_reads_the_embedded_config_itself_and_cli_passes(smol, calibration, vector, heldout_subset, tmp_path):
    out = compile_adapter(vector, tmp_path / "a", smol, calibration=calibration, heldout=heldout_subset[:4]).adapter_dir
    result = runner.invoke(app, ["check", str(out)])  # no --model: the adapter names the embedded model
    assert result.exit_code == 0, result.output
    assert "portable (chosen)" in result.output and "pass" in result.output and "fail" not in result.output
    results = check_adapter(out)
    assert results["portable"] == [] and all(v == [] for v in results.values()), results
    # drop the last layer: only knowing the model's 30 layers reveals it
    tensors = load_file(str(out / ADAPTER_WEIGHTS))
    for x in "AB":
        del tensors[O_PROJ.format(L=29, X=x)]
    save_file(tensors, str(out / ADAPTER_WEIGHTS))
    assert any("lacks layers [29]" in p for p in check_adapter(out, "portable")["portable"])


# ---- base_model_name_or_path ----


def test_local_model_needs_base_model_id(tiny, tiny_dir, tmp_path):
    vec = SteeringVector({1: torch.randn(64)}, "resid_mid")
    samples = corpus.default_calibration()[:8]
    local = compile_adapter(vec, tmp_path / "a", tiny, texts=samples, heldout=samples[:2])
    assert "pass --base-model-id" in local.report["warnings"][0]
    assert json.loads((local.adapter_dir / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == tiny_dir
    # the linter finds the local directory it names and checks shapes against its config
    tensors = load_file(str(local.adapter_dir / ADAPTER_WEIGHTS))
    tensors[O_PROJ.format(L=0, X="A")] = torch.zeros(4, 32)
    save_file(tensors, str(local.adapter_dir / ADAPTER_WEIGHTS))
    assert any("the base model needs [4, 64]" in p for p in check_adapter(local.adapter_dir, "vllm")["vllm"])
    named = compile_adapter(vec, tmp_path / "b", tiny, texts=samples, heldout=samples[:2], base_model_id="org/tiny")
    assert named.report["warnings"] == []
    assert json.loads((named.adapter_dir / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "org/tiny"
    with pytest.raises(LoraCompileError, match="unknown target"):
        compile_adapter(vec, tmp_path / "c", tiny, target="vllm2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


# ---- one hand-made breach per rule ----


def _steered(tiny):
    g = torch.Generator().manual_seed(0)
    return SiteWeights("resid_mid", 2, torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, generator=g))


@pytest.fixture()
def good(tiny, tmp_path):
    prof = PROFILES["portable"]
    tensors = adapter_tensors(tiny, [_steered(tiny)], prof)
    return write_adapter(tmp_path / "good", tensors, adapter_config(tiny.model_id, ["o_proj"], prof), {}, "")


def _rank(tensors, r):
    """Pad or cut every A/B to rank r (the extra rank is zeros)."""
    for k, v in tensors.items():
        dim = 0 if "_A" in k else 1
        n = v.shape[dim]
        if r <= n:
            tensors[k] = v.narrow(dim, 0, r).contiguous()
        else:
            pad = list(v.shape)
            pad[dim] = r - n
            tensors[k] = torch.cat([v, torch.zeros(pad, dtype=v.dtype)], dim)


def _set(key, value):
    return lambda t: t.update({key: value})


def _drop(*keys):
    def edit(t):
        for k in keys:
            del t[k]

    return edit


def _embedding(t):
    t[EMBED.format(X="A")] = torch.ones(4, 49152)
    t[EMBED.format(X="B")] = torch.randn(64, 4)


# (config edit, tensor edit, target that must reject it with the reason, a target that accepts it)
RULES = {
    "missing r": (lambda c: c.pop("r"), None, "vllm", "lacks 'r'", "llamacpp"),  # rank from the tensors
    "missing target_modules": (
        lambda c: c.pop("target_modules"),
        None,
        "fireworks",
        "lacks 'target_modules'",
        "llamacpp",
    ),
    "missing lora_alpha": (lambda c: c.pop("lora_alpha"), None, "llamacpp", "lacks 'lora_alpha'", "fireworks"),
    "lora_bias": (lambda c: c.update(lora_bias=True), None, "vllm", "lora_bias is True", "peft"),
    "dora": (lambda c: c.update(use_dora=True), None, "vllm", "use_dora is True", "peft"),
    "bias": (lambda c: c.update(bias="all"), None, "vllm", "bias is 'all'", "peft"),
    "modules_to_save": (lambda c: c.update(modules_to_save=["lm_head"]), None, "llamacpp", "modules_to_save", "peft"),
    "rank_pattern": (lambda c: c.update(rank_pattern={"o_proj": 4}), None, "vllm", "rank_pattern", "llamacpp"),
    "alpha_pattern": (lambda c: c.update(alpha_pattern={"o_proj": 8}), None, "llamacpp", "alpha_pattern", "peft"),
    "rslora": (lambda c: c.update(use_rslora=True), None, "sglang", "use_rslora is True", "vllm"),
    "rank above vLLM's default": (
        lambda c: c.update(r=32, lora_alpha=32),
        lambda t: _rank(t, 32),
        "vllm",
        "rank 32 is outside vllm's range",
        "sglang",
    ),
    "rank below Fireworks' minimum": (
        lambda c: c.update(r=2, lora_alpha=2),
        lambda t: _rank(t, 2),
        "fireworks",
        "rank 2 is outside fireworks's range",
        "vllm",
    ),
    "alpha != r": (lambda c: c.update(lora_alpha=8), None, "portable", "lora_alpha 8 != r 4", "vllm"),
    "target_modules string": (lambda c: c.update(target_modules="o_proj"), None, "portable", "not a list", "vllm"),
    "unknown key": (
        None,
        _set("base_model.model.model.layers.0.self_attn.o_proj.lora_magnitude_vector", torch.ones(64)),
        "vllm",
        "not a lora_A/lora_B/lora_embedding key",
        None,
    ),
    "embedding LoRA": (
        lambda c: c["target_modules"].append("embed_tokens"),
        _embedding,
        "tgi",
        "model.embed_tokens.lora_embedding_A is not a lora_A/lora_B key",
        "vllm",
    ),
    "module a target does not serve": (
        lambda c: c["target_modules"].append("lm_head"),
        lambda t: t.update(
            {
                "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
                "base_model.model.lm_head.lora_B.weight": torch.zeros(49152, 4),
            }
        ),
        "fireworks",
        "modules ['lm_head'] are not among fireworks's LoRA targets",
        "vllm",
    ),
    "tensors outside target_modules": (
        lambda c: c.update(target_modules=["q_proj"]),
        None,
        "peft",
        "tensors for modules ['o_proj'] not in target_modules",
        None,
    ),
    "missing layer": (
        None,
        _drop(O_PROJ.format(L=1, X="A"), O_PROJ.format(L=1, X="B")),
        "lorax",
        "lacks layers [1]",
        "vllm",
    ),
    "missing last layer": (
        None,
        _drop(O_PROJ.format(L=3, X="A"), O_PROJ.format(L=3, X="B")),
        "tgi",
        "lacks layers [3]",
        "sglang",
    ),
    "A without B": (None, _drop(O_PROJ.format(L=2, X="B")), "peft", "has no lora_B tensor", None),
    "wrong in_features": (
        None,
        _set(O_PROJ.format(L=0, X="A"), torch.zeros(4, 32)),
        "vllm",
        "has shape [4, 32], the base model needs [4, 64]",
        None,
    ),
    "wrong rank dimension": (
        None,
        _set(O_PROJ.format(L=0, X="B"), torch.zeros(64, 3)),
        "peft",
        "rank dimension is not r = 4",
        None,
    ),
    "fp16 overflow": (
        None,
        _set(O_PROJ.format(L=0, X="A"), torch.full((4, 64), 1e6)),
        "portable",
        "overflows float16",
        "fireworks",  # served in bf16: 1e6 fits
    ),
    "non-finite": (
        None,
        _set(O_PROJ.format(L=0, X="A"), torch.full((4, 64), float("nan"))),
        "peft",
        "inf or NaN",
        None,
    ),
    "float64 tensors": (
        None,
        _set(O_PROJ.format(L=0, X="A"), torch.zeros(4, 64, dtype=torch.float64)),
        "vllm",
        "is float64",
        None,
    ),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_linter_rejects_each_breach_with_its_reason(tiny, good, tmp_path, rule):
    config_edit, tensor_edit, target, reason, accepting = RULES[rule]
    assert all(p == [] for p in check_adapter(good, None, tiny).values())
    config = json.loads((good / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(good / ADAPTER_WEIGHTS))
    if config_edit:
        config_edit(config)
    if tensor_edit:
        tensor_edit(tensors)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / ADAPTER_CONFIG).write_text(json.dumps(config))
    save_file(tensors, str(bad / ADAPTER_WEIGHTS))
    results = check_adapter(bad, None, tiny)
    assert any(reason in p for p in results[target]), results[target]
    if accepting:
        assert results[accepting] == [], results[accepting]


def test_cli_exit_codes(tiny_dir, good, tmp_path):
    ok = runner.invoke(app, ["check", str(good), "--model", tiny_dir])
    assert ok.exit_code == 0, ok.output
    config = json.loads((good / ADAPTER_CONFIG).read_text())
    (good / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    assert runner.invoke(app, ["check", str(good), "--model", tiny_dir, "--target", "peft"]).exit_code == 0
    failed = runner.invoke(app, ["check", str(good), "--model", tiny_dir, "--target", "vllm"])
    assert failed.exit_code == 1 and "use_dora is True" in failed.output


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda d: None, "no adapter_config.json"),
        (lambda d: (d / ADAPTER_CONFIG).write_text("{not json"), "is not valid JSON"),
        (lambda d: (d / ADAPTER_CONFIG).write_text('{"peft_type": "IA3"}'), "not a PEFT LoRA config"),
        (lambda d: (d / ADAPTER_CONFIG).write_text('{"peft_type": "LORA"}'), "has no adapter_model.safetensors"),
        (
            lambda d: [(d / ADAPTER_CONFIG).write_text("{}"), (d / ADAPTER_WEIGHTS).write_bytes(b"garbage")],
            "cannot read",
        ),
    ],
)
def test_unreadable_adapter_is_a_one_line_error(tmp_path, setup, match):
    bad = tmp_path / "bad"
    bad.mkdir()
    setup(bad)
    with pytest.raises(LoraCompileError, match=match):
        check_adapter(bad)
    result = runner.invoke(app, ["check", str(bad)])
    err = result.stderr.strip()
    assert result.exit_code == 2 and len(err.splitlines()) == 1 and match in err, err
