"""Coefficient sweep with true addition: behaviour score and KL against the coefficient."""

import json

import pytest
import torch

from lora_compile import api, corpus
from lora_compile.errors import LoraCompileError
from lora_compile.extract import ContrastPair, read_pairs
from lora_compile.vectors import SteeringVector, save_vector

pytestmark = pytest.mark.numeric  # tolerances that depend on CPU kernels: run under two in CI


def test_happy_vector_raises_the_score_and_kl_grows_with_the_coefficient(smol, smol_vector, tmp_path):
    coefs = [-2.0, 0.0, 1.0, 2.0, 4.0, 8.0]
    pairs = read_pairs(corpus.demo_pairs_path())[:16]  # the first 16 shipped pairs: a quicker test
    out = {"out_png": tmp_path / "s.png", "out_json": tmp_path / "s.json"}
    result = api.sweep(smol_vector, smol, layers=[10], coefs=coefs, pairs=pairs, **out)
    rows = {r["coef"]: r for r in result.rows}
    scores = [rows[c]["score"] for c in coefs]
    assert all(a < b for a, b in zip(scores, scores[1:])), scores
    assert rows[0.0]["kl"] == 0.0
    assert 0 < rows[1.0]["kl"] < rows[2.0]["kl"] < rows[4.0]["kl"] < rows[8.0]["kl"]
    assert 0 < rows[-2.0]["kl"] and rows[8.0]["ordered"] > rows[-2.0]["ordered"]
    assert result.pairs == 16 and result.kl_tokens > 200
    assert json.loads((tmp_path / "s.json").read_text())["rows"] == result.rows
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_score_is_the_log_odds_gap_of_the_completions(smol, bound):
    """Check the score at coef 0 against log-probabilities computed by hand, one sequence at a time."""
    tok = smol.tokenizer
    pair = ContrastPair("Today I feel very happy", "Today I feel very sad")
    vec = SteeringVector({10: torch.zeros(smol.hidden_size)})
    result = api.sweep(vec, smol, coefs=[0.0], pairs=[pair])
    expected = 0.0
    for sign, word in ((1, " happy"), (-1, " sad")):
        prompt = tok("Today I feel very")["input_ids"]
        ids = prompt + tok(word, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(smol.model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        expected += sign * sum(float(logp[t - 1, ids[t]]) for t in range(len(prompt), len(ids)))
    bound("|score − independent log-odds|", abs(result.rows[0]["score"] - expected), 1e-4)


def test_prompts_only_gives_kl_without_a_score(tiny, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me about foxes.\n\nWhat is a river?")
    vec = SteeringVector({1: torch.randn(64, generator=torch.Generator().manual_seed(0))})
    result = api.sweep(vec, tiny, coefs=[0, 2], prompts=[prompts], out_png=tmp_path / "s.png")
    assert [r["score"] for r in result.rows] == [None, None] and result.pairs == 0
    assert result.rows[0]["kl"] == 0.0 < result.rows[1]["kl"]
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_same_inputs_same_outputs(tiny, tmp_path):
    vec = save_vector(SteeringVector({2: torch.ones(64)}), tmp_path / "v.safetensors")
    pairs = [ContrastPair("I am good today", "I am bad today"), ContrastPair("It was a fine day", "It was a grim day")]
    for name in ("a", "b"):
        api.sweep(vec, tiny, coefs=[0, 1], pairs=pairs, out_json=tmp_path / f"{name}.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"coefs": []}, "no coefficients"),
        ({"coefs": [0, float("nan")]}, "non-finite"),
        ({"layers": [3]}, "no direction for layer"),
        ({"site": "resid_in"}, "unknown site"),
        ({"pairs": [ContrastPair("Happy day", "Sad day")]}, "no shared prompt"),
    ],
)
def test_bad_input_writes_nothing(tiny, tmp_path, kwargs, match):
    vec = SteeringVector({1: torch.ones(64)})
    args = {"pairs": [ContrastPair("I am good", "I am bad")], **kwargs}
    with pytest.raises(LoraCompileError, match=match):
        api.sweep(vec, tiny, out_png=tmp_path / "s.png", out_json=tmp_path / "s.json", **args)
    assert list(tmp_path.iterdir()) == []
