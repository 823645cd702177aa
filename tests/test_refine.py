"""compile --refine: KL refinement from the closed form, wired on a tiny random model."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_compile import api, corpus
from lora_compile.calibrate import encode
from lora_compile.cli import app
from lora_compile.display import print_refine
from lora_compile.errors import LoraCompileError
from lora_compile.refine import RefineOptions, _Batch, _Runner, train_lora
from lora_compile.targets import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROFILES
from lora_compile.vectors import SteeringVector, save_vector

# A budget that keeps each tiny compile to a second or two; a random model's closed form is far off,
# so larger steps than the default's.
FAST = RefineOptions(
    steps=6, batch_samples=2, train_samples=6, val_samples=3, max_tokens=32, eval_every=2, lr_scale=0.02
)
# The shipped calibration corpus: varied enough that the tiny model's closed form leaves room to refine.
TEXTS = corpus.default_calibration()
HELDOUT = [
    corpus.Sample("stories", text="Once upon a time there was a fox who lived by the river."),
    corpus.Sample("chat", messages=(("user", "Tell me a joke about numbers."),)),
]


def _vector(tiny, layer=1, site="resid_mid", scale=4.0) -> SteeringVector:
    gen = torch.Generator().manual_seed(3)
    return SteeringVector({layer: scale * torch.randn(tiny.hidden_size, generator=gen)}, site)


def _compile(tiny, out, vector, **kw):
    return api.compile_adapter(
        vector, out, tiny, coef=1.0, heldout=HELDOUT, **{"refine": True, "refine_options": FAST, **kw}
    )


def test_running_from_the_first_steered_layer_gives_the_full_models_logits(tiny):
    samples = encode(tiny, TEXTS[:3], 32)
    runner = _Runner(tiny, 2)
    (batch,) = runner.prepare(samples, 3, 32)
    assert batch.inputs.dim() == 3  # the cached stream, not token ids: layers 0-1 were skipped
    ids = torch.full(batch.mask.shape, tiny.tokenizer.pad_token_id)
    for row, i in enumerate(batch.samples):
        ids[row, : len(samples[i])] = torch.tensor(samples[i])
    with torch.no_grad():
        full = tiny.model(input_ids=ids, attention_mask=batch.mask, use_cache=False).logits[batch.mask.bool()]
        cut = runner.logits(_Batch(batch.inputs, batch.mask, batch.samples))
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-5)
    assert len(tiny.model.model.layers) == tiny.num_layers  # the stack is whole again


def test_refined_adapter_is_reproducible_never_worse_and_served(tiny, tmp_path):
    vector = _vector(tiny)
    first = _compile(tiny, tmp_path / "a", vector)
    _compile(tiny, tmp_path / "b", vector)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    refine = first.report["refine"]
    assert refine["kl_ratio_best"] <= refine["kl_ratio_initial"]  # never worse on the validation split
    assert refine["kept"] == "refined" and refine["best_step"] > 0  # a random tiny model leaves room to improve
    assert refine["kl_ratio_best"] < 0.9 * refine["kl_ratio_initial"]
    assert 0 < refine["steps"] <= FAST.steps and refine["seconds"] > 0
    heldout = refine["heldout"]["adapters"]
    assert set(heldout["refined"]["per_domain"]) == {"stories", "chat"}
    # Every target's linter passes, and PEFT, loading the files, sees what the report says.
    assert api.check_adapter(tmp_path / "a", model=tiny) == {p: [] for p in PROFILES}
    verified = api.verify_adapter(tmp_path / "a", vector, tiny, prompts=HELDOUT, generations=0)
    assert verified.kl_ratio == pytest.approx(heldout["refined"]["kl_ratio"], rel=1e-3)
    closed = api.compile_adapter(vector, tmp_path / "c", tiny, coef=1.0, heldout=HELDOUT)
    before = api.verify_adapter(tmp_path / "c", vector, tiny, prompts=HELDOUT, generations=0)
    assert before.kl_ratio == pytest.approx(heldout["closed_form"]["kl_ratio"], rel=1e-3)
    assert closed.report["refine"] is None


def test_closed_form_is_kept_where_refinement_does_not_help(tiny, tmp_path):
    # Steps too small to move a float32 factor: validation never improves on step 0, the closed form stays.
    vector = _vector(tiny)
    still = RefineOptions(**{**FAST.__dict__, "lr": 1e-12})
    result = _compile(tiny, tmp_path / "r", vector, refine_options=still)
    assert result.report["refine"]["kept"] == "closed_form" and result.report["refine"]["best_step"] == 0
    api.compile_adapter(vector, tmp_path / "c", tiny, coef=1.0, heldout=HELDOUT)
    assert (tmp_path / "r" / ADAPTER_WEIGHTS).read_bytes() == (tmp_path / "c" / ADAPTER_WEIGHTS).read_bytes()


def test_a_settled_closed_form_is_kept_without_a_step(tiny, tmp_path, capsys):
    # Any closed form is "settled" below a huge ratio: no training targets, no step, the closed form's bytes.
    vector = _vector(tiny)
    settled = dataclasses.replace(FAST, settled_below=1e9)
    result = _compile(tiny, tmp_path / "s", vector, refine_options=settled)
    refine = result.report["refine"]
    assert refine["settled"] and refine["steps"] == 0 and refine["kept"] == "closed_form"
    assert [h["step"] for h in refine["history"]] == [0]
    adapters = refine["heldout"]["adapters"]
    assert adapters["refined"] == adapters["closed_form"]
    api.compile_adapter(vector, tmp_path / "c", tiny, coef=1.0, heldout=HELDOUT)
    assert (tmp_path / "s" / ADAPTER_WEIGHTS).read_bytes() == (tmp_path / "c" / ADAPTER_WEIGHTS).read_bytes()
    assert "Not refined" in (tmp_path / "s" / "README.md").read_text()
    print_refine(refine)
    assert "none needed" in capsys.readouterr().out
    assert not _compile(tiny, tmp_path / "r", vector).report["refine"]["settled"]  # the tiny model's is far off
    for bad in (-1.0, float("nan")):
        with pytest.raises(LoraCompileError, match="settled ratio"):
            dataclasses.replace(FAST, settled_below=bad).check()


def test_more_rank_loads_in_peft_and_lints(tiny, tmp_path):
    vector = _vector(tiny, layer=2, site="resid_post")
    options = RefineOptions(**{**FAST.__dict__, "rank": 2})
    result = _compile(tiny, tmp_path / "r2", vector, refine_options=options)  # portable: padded to rank 4
    config = json.loads((tmp_path / "r2" / ADAPTER_CONFIG).read_text())
    assert config["r"] == config["lora_alpha"] == result.report["rank"] == 4
    a = load_file(str(tmp_path / "r2" / ADAPTER_WEIGHTS))["base_model.model.model.layers.2.mlp.down_proj.lora_A.weight"]
    assert [bool(row.any()) for row in a] == [True, True, False, False]
    assert api.check_adapter(tmp_path / "r2", model=tiny) == {p: [] for p in PROFILES}
    verified = api.verify_adapter(tmp_path / "r2", vector, tiny, prompts=HELDOUT, generations=0)
    assert verified.kl_ratio == pytest.approx(
        result.report["refine"]["heldout"]["adapters"]["refined"]["kl_ratio"], rel=1e-3
    )


def test_standard_init_starts_as_the_unsteered_model(tiny):
    vector = _vector(tiny)
    result = train_lora(tiny, vector, TEXTS, init="standard", options=FAST)
    assert result.kl_ratio_initial == pytest.approx(1.0, abs=1e-9)  # B = 0: the adapter adds nothing
    assert result.history[0]["step"] == 0 and 0 < result.steps <= FAST.steps
    (a, b), *_ = result.factors.values()
    assert bool(b.any()) == (result.best_step > 0)  # the best factors: the init itself only at step 0


def test_extra_modules_start_adding_nothing_and_are_trained(tiny):
    """The next-layer route's query/key LoRAs (``extra_modules``): B = 0 at step 0, then trained with the rest."""
    vector = _vector(tiny, layer=2)
    pattern = tiny.arch.pattern_modules("resid_mid", 2)
    assert pattern == ("model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.k_proj")
    result = train_lora(tiny, vector, TEXTS, init="standard", options=FAST, extra_modules=pattern)
    assert result.kl_ratio_initial == pytest.approx(1.0, abs=1e-9)  # they add nothing at the start
    assert set(result.factors) == {"model.layers.2.self_attn.o_proj", *pattern} and result.best_step > 0
    assert all(bool(result.factors[m][1].any()) for m in pattern)  # B moved: the gradient reaches them
    again = train_lora(tiny, vector, TEXTS, init="standard", options=FAST, extra_modules=pattern).factors
    assert all(torch.equal(again[m][i], result.factors[m][i]) for m in again for i in (0, 1))  # seeded


def test_a_time_budget_stops_after_an_evaluation(tiny):
    """max_seconds (the benchmark's 10× compile time): the step that overruns it is evaluated, then training stops."""
    options = dataclasses.replace(FAST, steps=1000, patience=1000, max_seconds=1e-6)
    result = train_lora(tiny, _vector(tiny), TEXTS, init="standard", options=options)
    assert result.steps == 1 and [h["step"] for h in result.history] == [0, 1]
    with pytest.raises(LoraCompileError, match="time budget must be positive"):
        RefineOptions(max_seconds=0).check()


def test_refine_at_the_exact_site_is_skipped_with_a_warning(tiny, tmp_path):
    vector = _vector(tiny, layer=0, site="resid_pre")
    result = _compile(tiny, tmp_path / "pre", vector, target="vllm")
    assert result.report["refine"] is None and result.report["exact"]
    assert any("--refine skipped" in w for w in result.report["warnings"])


def test_rank_without_refine_is_refused(tiny, tmp_path, tiny_dir):
    with pytest.raises(LoraCompileError, match="needs --refine"):
        api.compile_adapter(_vector(tiny), tmp_path / "x", tiny, refine_options=RefineOptions(rank=2))
    vec = str(save_vector(_vector(tiny), tmp_path / "v.safetensors"))
    result = CliRunner().invoke(app, ["compile", "-v", vec, "-o", str(tmp_path / "o"), "-m", tiny_dir, "--rank", "2"])
    assert result.exit_code == 2 and "needs --refine" in result.stderr
    assert not (tmp_path / "o").exists()


def test_cli_refine_samples_sets_the_split(tmp_path, tiny, tiny_dir):
    """--refine-samples N: N calibration samples trained on, a quarter of them (at least 8) held back."""
    vec = str(save_vector(_vector(tiny), tmp_path / "v.safetensors"))
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("A fox by the river.\n\nTell me a joke about numbers.\n")
    args = ["compile", "-v", vec, "-m", tiny_dir, "--heldout", str(heldout), "--refine", "--refine-steps", "1"]
    result = CliRunner().invoke(app, [*args, "--refine-samples", "36", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    options = json.loads((tmp_path / "o" / "compile_report.json").read_text())["refine"]["options"]
    assert (options["train_samples"], options["val_samples"], options["steps"]) == (36, 9, 1)


def test_refinement_starts_from_both_routes(tiny, tmp_path):
    """--route both --refine: trained and measured with the v_proj LoRA as well as o_proj's."""
    vector = _vector(tiny)
    texts = TEXTS[::8]
    result = _compile(tiny, tmp_path / "r", vector, route="both", texts=texts)
    refine = result.report["refine"]
    assert result.report["target_modules"] == ["o_proj", "v_proj"]
    # the held-out measure of the closed form is the two-LoRA adapter's, as PEFT loads it
    closed = api.compile_adapter(vector, tmp_path / "c", tiny, coef=1.0, heldout=HELDOUT, route="both", texts=texts)
    before = api.verify_adapter(closed.adapter_dir, vector, tiny, prompts=HELDOUT, generations=0)
    assert before.kl_ratio == pytest.approx(refine["heldout"]["adapters"]["closed_form"]["kl_ratio"], rel=1e-3)
    after = api.verify_adapter(result.adapter_dir, vector, tiny, prompts=HELDOUT, generations=0)
    assert after.kl_ratio == pytest.approx(refine["heldout"]["adapters"][refine["kept"]]["kl_ratio"], rel=1e-3)
    # the writer's LoRA alone (what the value route bought), as the writer-route adapter measures it
    writer = api.compile_adapter(vector, tmp_path / "w", tiny, coef=1.0, heldout=HELDOUT, texts=texts)
    alone = api.verify_adapter(writer.adapter_dir, vector, tiny, prompts=HELDOUT, generations=0)
    assert alone.kl_ratio == pytest.approx(refine["heldout"]["adapters"]["writer_only"]["kl_ratio"], rel=1e-3)
    assert (
        "writer_only"
        not in _compile(tiny, tmp_path / "r2", vector, texts=texts).report["refine"]["heldout"]["adapters"]
    )
