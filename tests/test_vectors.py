import pytest
import torch
from safetensors.torch import save_file

from lora_compile.errors import LoraCompileError
from lora_compile.vectors import SteeringVector, load_vector, save_vector


def test_save_load_round_trip(tmp_path):
    v = SteeringVector({3: torch.randn(64), 1: torch.randn(64)}, "resid_mid", {"method": "test"})
    path = save_vector(v, tmp_path / "v.safetensors")
    back = load_vector(path)
    assert back.layers == [1, 3] and back.site == "resid_mid" and back.metadata == {"method": "test"}
    torch.testing.assert_close(back.directions[3], v.directions[3])


def test_equal_vectors_give_byte_identical_files(tmp_path):
    v = SteeringVector({1: torch.ones(8)}, metadata={f"key{i}": str(i) for i in range(12)})
    a, b = save_vector(v, tmp_path / "a.safetensors"), save_vector(v, tmp_path / "b.safetensors")
    assert a.read_bytes() == b.read_bytes() and load_vector(a).metadata == v.metadata


def test_separability_metadata():
    v = SteeringVector({1: torch.ones(8)}, metadata={"separability": '{"1":{"ordered":0.9}}'})
    assert v.separability == {1: {"ordered": 0.9}} and SteeringVector({1: torch.ones(8)}).separability == {}


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


def test_resid_pre_vectors_load_and_exist_only_at_layer_0(tiny, tmp_path):
    path = save_vector(SteeringVector({0: torch.randn(64)}, "resid_pre"), tmp_path / "pre.safetensors")
    back = load_vector(path)
    assert back.site == "resid_pre" and back.layers == [0]
    back.validate(tiny)
    with pytest.raises(LoraCompileError, match="only at layer"):
        SteeringVector({2: torch.randn(64)}, "resid_pre").validate(tiny)
