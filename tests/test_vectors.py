import json

import pytest
import torch
from safetensors.torch import save_file

from lora_compile import corpus
from lora_compile.errors import LoraCompileError
from lora_compile.vectors import SteeringVector, load_vector, read_pairs, save_vector


def test_save_load_round_trip(tmp_path):
    v = SteeringVector({3: torch.randn(64), 1: torch.randn(64)}, "resid_mid", {"method": "test"})
    path = save_vector(v, tmp_path / "v.safetensors")
    back = load_vector(path)
    assert back.layers == [1, 3] and back.site == "resid_mid" and back.metadata == {"method": "test"}
    torch.testing.assert_close(back.directions[3], v.directions[3])


def test_shipped_pairs_are_enough():
    pairs = read_pairs(corpus.demo_pairs_path())
    assert len(pairs) >= 32 and all(p != n for p, n in pairs)


def test_extraction_matches_hidden_states_computed_independently(smol, smol_vector):
    pairs = read_pairs(corpus.demo_pairs_path())
    sums = {10: torch.zeros(576, dtype=torch.float64), 18: torch.zeros(576, dtype=torch.float64)}
    for pos, neg in pairs:
        for text, sign in ((pos, 1.0), (neg, -1.0)):
            ids = smol.tokenizer(text, return_tensors="pt")
            with torch.no_grad():
                hs = smol.model(**ids, output_hidden_states=True).hidden_states
            for layer in sums:
                sums[layer] += sign * hs[layer + 1][0, -1].double()
    for layer, total in sums.items():
        expected = total / len(pairs)
        got = smol_vector.directions[layer].double()
        cos = float(got @ expected / (got.norm() * expected.norm()))
        assert cos > 0.9999
    assert smol_vector.site == "resid_post" and smol_vector.metadata["method"] == "mean_diff"


def _file(tmp_path, tensors, metadata=None):
    p = tmp_path / "v.safetensors"
    save_file(tensors, str(p), metadata=metadata)
    return p


@pytest.mark.parametrize(
    "tensors, metadata, match",
    [
        ({"other": torch.zeros(4)}, None, "no direction.N tensors"),
        ({"direction.1": torch.zeros(4, dtype=torch.int32)}, None, "floating point"),
        ({"direction.1": torch.zeros(4)}, {"site": "resid_in"}, "unknown site"),
    ],
)
def test_bad_vector_files(tmp_path, tensors, metadata, match):
    with pytest.raises(LoraCompileError, match=match):
        load_vector(_file(tmp_path, tensors, metadata))


def test_not_a_safetensors_file(tmp_path):
    p = tmp_path / "v.safetensors"
    p.write_text("hello")
    with pytest.raises(LoraCompileError, match="not a readable safetensors"):
        load_vector(p)
    with pytest.raises(LoraCompileError, match="does not exist"):
        load_vector(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    "directions, match",
    [
        ({1: torch.zeros(65)}, "hidden size 64"),
        ({9: torch.zeros(64)}, "out of range"),
        ({1: torch.full((64,), float("nan"))}, "NaN"),
    ],
)
def test_validation_against_the_model(tiny, directions, match):
    with pytest.raises(LoraCompileError, match=match):
        SteeringVector(directions).validate(tiny)


def test_select_unknown_layer():
    with pytest.raises(LoraCompileError, match="no direction for layer"):
        SteeringVector({1: torch.zeros(4)}).select([2])


def test_bad_pairs(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"positive": "a"}) + "\n")
    with pytest.raises(LoraCompileError, match="'positive' and 'negative'"):
        read_pairs(p)


def test_resid_pre_vectors_load_and_exist_only_at_layer_0(tiny, tmp_path):
    path = save_vector(SteeringVector({0: torch.randn(64)}, "resid_pre"), tmp_path / "pre.safetensors")
    back = load_vector(path)
    assert back.site == "resid_pre" and back.layers == [0]
    back.validate(tiny)
    with pytest.raises(LoraCompileError, match="only at layer"):
        SteeringVector({2: torch.randn(64)}, "resid_pre").validate(tiny)
