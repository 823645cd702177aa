"""Extraction from contrast pairs: every method and position against an independent reference."""

import json
import os

import numpy as np
import pytest
import torch

from lora_compile import api, corpus
from lora_compile.errors import LoraCompileError
from lora_compile.extract import METHODS, POSITIONS, ContrastPair, extract, read_contrast_texts, read_pairs
from lora_compile.vectors import load_vector

LAYERS = [10, 18]
REFERENCE_PAIRS = 16  # the first 16 shipped pairs: one text at a time is slow


def test_shipped_pairs_are_enough():
    pairs = read_pairs(corpus.demo_pairs_path())
    assert len(pairs) >= 32 and all(p.positive != p.negative for p in pairs)


def test_split_at_the_common_prefix():
    pair = ContrastPair("I felt so happy that I", "I felt so sad that I")
    assert pair.split() == ("I felt so", " happy that I", " sad that I")
    assert ContrastPair("Answer: (A", "Answer: (B").split() == ("Answer:", " (A", " (B")
    assert ContrastPair("(A", "(B", prompt="Pick one").split() == ("Pick one", "(A", "(B")


def _reference_texts(tok, position):
    """Every pair's (positive, negative) as the model should see them, built without the package's helpers."""
    out = []
    for line in corpus.demo_pairs_path().read_text().splitlines()[:REFERENCE_PAIRS]:
        rec = json.loads(line)
        pos, neg = rec["positive"], rec["negative"]
        if position != "answer":
            out.append((tok(pos)["input_ids"], tok(neg)["input_ids"]))
            continue
        prompt = os.path.commonprefix([pos, neg]).rsplit(" ", 1)[0]
        chat = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = [tok(chat + text[len(prompt) + 1 :], add_special_tokens=False)["input_ids"] for text in (pos, neg)]
        out.append(tuple(ids))
    return out


@pytest.fixture(scope="module")
def reference_states(smol):
    """Per position: positive and negative states [n, d] per layer, one text at a time, no padding."""
    states = {}
    for position in POSITIONS:
        rows = {layer: ([], []) for layer in LAYERS}
        for pair in _reference_texts(smol.tokenizer, position):
            for side, ids in enumerate(pair):
                with torch.no_grad():
                    hs = smol.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
                for layer in LAYERS:
                    h = hs[layer + 1][0].double()
                    rows[layer][side].append(h.mean(0) if position == "mean" else h[-1])
        states[position] = {layer: (torch.stack(p).numpy(), torch.stack(n).numpy()) for layer, (p, n) in rows.items()}
    return states


def _reference_vector(pos: np.ndarray, neg: np.ndarray, method: str) -> np.ndarray:
    diff = pos - neg
    if method == "mean_diff":
        return diff.mean(0)
    # repeng: sklearn PCA (which centres) of the differences, or of each pair centred on its own mean
    train = diff if method == "pca_diff" else np.concatenate([pos - (pos + neg) / 2, neg - (pos + neg) / 2])
    train = train - train.mean(0)
    _, vecs = np.linalg.eigh(train.T @ train)
    axis = vecs[:, -1]
    return (diff.mean(0) @ axis) * axis


@pytest.mark.numeric
@pytest.mark.kernel_stable
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("method", METHODS)
def test_extraction_matches_hidden_states_computed_independently(smol, reference_states, method, position, bound):
    vec = extract(smol, read_pairs(corpus.demo_pairs_path())[:REFERENCE_PAIRS], LAYERS, method, position)
    for layer in LAYERS:
        pos, neg = reference_states[position][layer]
        expected = _reference_vector(pos, neg, method)
        got = vec.directions[layer].double().numpy()
        cos = float(got @ expected / (np.linalg.norm(got) * np.linalg.norm(expected)))
        bound(f"cosine to independent hidden states, {method}/{position}", cos, 0.9999, "min")
        # sign convention: positive texts project higher on average
        assert float(((pos - neg) @ got).mean()) > 0
    assert vec.site == "resid_post" and vec.metadata["method"] == method and vec.metadata["position"] == position


@pytest.mark.numeric
def test_separability_is_reported_and_stored(smol, smol_vector, tmp_path):
    sep = smol_vector.separability
    assert sorted(sep) == LAYERS
    for layer in LAYERS:
        assert sep[layer]["ordered"] >= 0.9 and sep[layer]["gap_over_std"] > 1.0, sep
    api.extract_vector(corpus.demo_pairs_path(), LAYERS, smol, tmp_path / "v.safetensors")
    stored = load_vector(tmp_path / "v.safetensors")
    assert stored.separability == sep
    assert " " not in stored.metadata["separability"]  # compact JSON


def _pairs_file(tmp_path, n=4, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text(
        "\n".join(json.dumps({"positive": f"I am good {i}", "negative": f"I am bad {i}"}) for i in range(n))
    )
    return path


def test_text_files_give_the_same_vector_as_a_pairs_file(tiny, tmp_path):
    pairs = _pairs_file(tmp_path)
    (tmp_path / "pos.txt").write_text("".join(f"I am good {i}\n" for i in range(4)))
    (tmp_path / "neg.txt").write_text("\n\n".join(f"I am bad {i}" for i in range(4)))  # blank-line convention
    (tmp_path / "neg.jsonl").write_text("\n".join(json.dumps({"text": f"I am bad {i}"}) for i in range(4)))
    ref = api.extract_vector(pairs, [1, 3], tiny)
    for negative in ("neg.txt", "neg.jsonl"):
        got = api.extract_vector(None, [1, 3], tiny, positive=tmp_path / "pos.txt", negative=tmp_path / negative)
        for layer in (1, 3):
            torch.testing.assert_close(got.directions[layer], ref.directions[layer])


def test_deterministic_files_and_few_pairs_warning(tiny, tmp_path, capsys):
    pairs = _pairs_file(tmp_path)
    for name in ("a.safetensors", "b.safetensors"):
        api.extract_vector(pairs, [0, 2], tiny, tmp_path / name, method="pca_center", position="mean")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert "warning: only 4 contrast pairs" in capsys.readouterr().err


def test_answer_position_reads_the_answer_token(tiny):
    from lora_compile.extract import _token_lists

    tok = tiny.tokenizer
    pair = ContrastPair("(A", "(B", prompt="Which is right? (A) yes (B) no")
    pos, neg = _token_lists(tiny, [pair], "answer")
    assert tok.decode(pos).endswith("<|im_start|>assistant\n(A") and tok.decode(neg).endswith("assistant\n(B")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "pca"}, "unknown extraction method 'pca'"),
        ({"position": "first"}, "unknown token position 'first'"),
        ({"layers": [4]}, "layer 4 is out of range"),
        ({"layers": []}, "no layers given"),
        ({"pairs": "empty.jsonl"}, "holds no contrast pairs"),
        ({"pairs": "missing.jsonl"}, "does not exist"),
        ({"pairs": "one.jsonl"}, "at least 2 are needed"),
        ({"pairs": "same.jsonl"}, "identical"),
        ({"pairs": None, "positive": "pos.txt", "negative": "neg.txt"}, "has 3 texts but"),
        ({"pairs": None, "positive": "pos.txt", "negative": "empty.txt"}, "holds no text"),
        ({"positive": "pos.txt", "negative": "pos.txt"}, "not both"),
        ({"pairs": None, "positive": "pos.txt"}, "give both --positive and --negative"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, kwargs, match):
    _pairs_file(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "one.jsonl").write_text(json.dumps({"positive": "a b", "negative": "a c"}))
    (tmp_path / "same.jsonl").write_text(json.dumps({"positive": "a b", "negative": "a b"}))
    (tmp_path / "pos.txt").write_text("a\nb\nc\n")
    (tmp_path / "neg.txt").write_text("x\ny\n")
    args = {"pairs": "pairs.jsonl", "layers": [1], **kwargs}
    for key in ("pairs", "positive", "negative"):
        if args.get(key) is not None:
            args[key] = tmp_path / args[key]
    before = sorted(tmp_path.iterdir())
    with pytest.raises(LoraCompileError, match=match) as err:
        api.extract_vector(model=tiny, out=tmp_path / "v.safetensors", **args)
    assert "\n" not in str(err.value)
    assert sorted(tmp_path.iterdir()) == before


def test_read_contrast_texts_pairs_in_order(tmp_path):
    (tmp_path / "p.txt").write_text("happy one\nhappy two\n")
    (tmp_path / "n.txt").write_text("sad one\nsad two\n")
    assert read_contrast_texts(tmp_path / "p.txt", tmp_path / "n.txt")[1] == ContrastPair("happy two", "sad two")


def test_bad_pairs(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"positive": "a"}) + "\n")
    with pytest.raises(LoraCompileError, match="'positive' and 'negative'"):
        read_pairs(p)
