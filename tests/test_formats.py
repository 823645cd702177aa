"""Foreign vector formats: each import means what its origin tool means (layer offsets), GGUF round trips
with repeng's own reader, writer and ControlModel, and one-line errors for bad files."""

from __future__ import annotations

import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from safetensors.torch import save_file
from typer.testing import CliRunner

from lora_compile import export_gguf, import_vector
from lora_compile.cli import app
from lora_compile.errors import LoraCompileError
from lora_compile.formats import read_vector
from lora_compile.models import embedded_model_path
from lora_compile.vectors import SteeringVector, load_vector, save_vector
from lora_compile.verify import true_addition

runner = CliRunner()
PROMPT = "The weather report for tomorrow says that"


@pytest.fixture(scope="module")
def repeng():
    """repeng 0.4 pins numpy<2 only for ``np.float_`` in annotations; give it the alias while it imports."""
    added = not hasattr(np, "float_")
    if added:
        np.float_ = np.float64
    try:
        import repeng
    finally:
        if added:
            del np.float_
    return repeng


def _randn(d: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(d, generator=torch.Generator().manual_seed(seed))


def _logits(loaded, model=None) -> torch.Tensor:
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return (model or loaded.model)(input_ids=ids, use_cache=False).logits


def _block(loaded, layer: int) -> torch.nn.Module:
    return loaded.module(loaded.arch.layer_module(layer))


@contextmanager
def _hooks(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def add_to_block_output(loaded, vectors: dict[int, torch.Tensor]):
    """llama.cpp / repeng / steering-vectors decoder_block: add to what block L returns."""

    def hook(vec):
        def add(_module, _args, output):
            return (output[0] + vec,) + tuple(output[1:]) if isinstance(output, tuple) else output + vec

        return add

    return _hooks([_block(loaded, k).register_forward_hook(hook(v)) for k, v in vectors.items()])


def add_to_block_input(loaded, vectors: dict[int, torch.Tensor]):
    """IBM activation-steering's LeashLayer: add to the hidden states block k receives, then run it."""

    def hook(vec):
        def add(_module, args, kwargs):
            return (args[0] + vec,) + tuple(args[1:]), kwargs

        return add

    return _hooks([_block(loaded, k).register_forward_pre_hook(hook(v), with_kwargs=True) for k, v in vectors.items()])


def _assert_same_and_steered(steered, reference, plain, bound):
    assert (reference - plain).abs().max() > 1e-2  # the steering does something
    bound.close("our steering vs the other tool's, logits", steered, reference, 1e-4, 1e-4)


# ---- llama.cpp / repeng GGUF -------------------------------------------------------------


@contextmanager
def repeng_steering(repeng, loaded, control_vector):
    """repeng's own application; it wraps the layers in place, so always unwrap."""
    model = repeng.ControlModel(loaded.model, sorted(control_vector.directions))
    try:
        model.set_control(control_vector, 1.0)
        yield model
    finally:
        model.reset()
        model.unwrap()
    assert all(not type(_block(loaded, k)).__name__.startswith("Control") for k in control_vector.directions)


@pytest.mark.numeric
def test_repeng_gguf_imports_at_the_layers_repeng_steers(smol, repeng, tmp_path, bound):
    directions = {4: _randn(576, 1).numpy(), 17: _randn(576, 2).numpy()}
    repeng.ControlVector(model_type="llama", directions=directions).export_gguf(str(tmp_path / "r.gguf"))
    vec = import_vector(tmp_path / "r.gguf", tmp_path / "v.safetensors", model=smol)
    assert vec.site == "resid_post" and vec.layers == [4, 17]
    assert vec.metadata["model_hint"] == "llama" and vec.metadata["model"] == smol.model_id
    saved = load_vector(tmp_path / "v.safetensors")
    assert saved.metadata["source"] == "r.gguf" and saved.metadata["method"].startswith("llama.cpp")
    for k, d in directions.items():
        torch.testing.assert_close(saved.directions[k], torch.from_numpy(d), rtol=0, atol=0)

    plain = _logits(smol)
    with repeng_steering(repeng, smol, repeng.ControlVector.import_gguf(str(tmp_path / "r.gguf"))) as model:
        theirs = _logits(smol, model)
    with true_addition(smol, saved):
        ours = _logits(smol)
    _assert_same_and_steered(ours, theirs, plain, bound)
    # An off-by-one import would not pass: the same vectors one block later give other logits.
    with true_addition(smol, SteeringVector({k + 1: v for k, v in saved.directions.items()})):
        assert (_logits(smol) - theirs).abs().max() > 1e-2
    torch.testing.assert_close(_logits(smol), plain, rtol=0, atol=0)  # the shared model is left clean


@pytest.mark.numeric
def test_our_gguf_export_is_read_by_repeng_at_the_same_layers(smol, repeng, tmp_path, bound):
    vec = SteeringVector({6: _randn(576, 3), 20: _randn(576, 4)}, metadata={"model": smol.model_id})
    path = export_gguf(vec, tmp_path / "o.gguf", model=smol)
    control_vector = repeng.ControlVector.import_gguf(str(path))
    assert control_vector.model_type == "llama" and sorted(control_vector.directions) == [6, 20]
    plain = _logits(smol)
    with repeng_steering(repeng, smol, control_vector) as model:
        theirs = _logits(smol, model)
    with true_addition(smol, vec):
        ours = _logits(smol)
    _assert_same_and_steered(ours, theirs, plain, bound)
    # Deterministic, and our own reader gives back exactly what was written.
    assert export_gguf(vec, tmp_path / "o2.gguf", model=smol).read_bytes() == path.read_bytes()
    back = read_vector(path)
    for k in vec.layers:
        torch.testing.assert_close(back.directions[k], vec.directions[k], rtol=0, atol=0)


def _gguf(path, tensors: dict[str, np.ndarray], arch="controlvector", count_type="int32"):
    writer = GGUFWriter(str(path), arch)
    writer.add_string(f"{arch}.model_hint", "llama")
    getattr(writer, f"add_{count_type}")(f"{arch}.layer_count", len(tensors))
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_layer_count_may_be_int32_or_uint32(tmp_path):
    for count_type in ("int32", "uint32"):
        p = _gguf(tmp_path / f"{count_type}.gguf", {"direction.3": np.ones(8, np.float32)}, count_type=count_type)
        assert read_vector(p).layers == [3]


def test_export_refuses_what_a_control_vector_cannot_say(tmp_path):
    with pytest.raises(LoraCompileError, match="resid_mid"):
        export_gguf(SteeringVector({3: torch.ones(8)}, "resid_mid"), tmp_path / "a.gguf")
    with pytest.raises(LoraCompileError, match="direction.0"):
        export_gguf(SteeringVector({0: torch.ones(8), 2: torch.ones(8)}), tmp_path / "b.gguf")
    assert export_gguf(SteeringVector({0: torch.ones(8), 2: torch.ones(8)}), tmp_path / "c.gguf", layers=[2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.gguf"]


# ---- IBM activation-steering .svec ---------------------------------------------------------


def _svec(path, directions: dict[int, torch.Tensor]):
    path.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "directions": {str(k): v.tolist() for k, v in directions.items()},
                "explained_variances": {str(k): 0.5 for k in directions},
            }
        )
    )
    return path


@pytest.mark.numeric
def test_svec_layer_k_is_the_input_of_block_k(tiny, tmp_path, bound):
    ibm = {1: _randn(64, 5), 3: _randn(64, 6)}
    vec = import_vector(_svec(tmp_path / "v.svec", ibm), model=tiny)
    assert vec.site == "resid_post" and vec.layers == [0, 2] and vec.metadata["model_hint"] == "llama"
    plain = _logits(tiny)
    with add_to_block_input(tiny, ibm):
        theirs = _logits(tiny)
    with true_addition(tiny, vec):
        ours = _logits(tiny)
    _assert_same_and_steered(ours, theirs, plain, bound)


@pytest.mark.numeric
def test_svec_layer_0_is_the_embedding_output(tiny, tmp_path, bound):
    ibm = {0: _randn(64, 7), 2: _randn(64, 8)}
    path = _svec(tmp_path / "v.svec", ibm)
    with pytest.raises(LoraCompileError, match="--layers"):
        import_vector(path)
    vec = import_vector(path, tmp_path / "v0.safetensors", layers=[0])
    assert vec.site == "resid_pre" and vec.layers == [0]
    assert import_vector(path, layers=[2]).layers == [1]
    plain = _logits(tiny)
    with add_to_block_input(tiny, {0: ibm[0]}):
        theirs = _logits(tiny)
    with true_addition(tiny, vec):  # resid_pre 0: added to the embedding output
        ours = _logits(tiny)
    _assert_same_and_steered(ours, theirs, plain, bound)
    assert import_vector(path, layers=[0], model=tiny).directions[0].equal(vec.directions[0])


# ---- tensor files and steering-vectors -------------------------------------------------------


def _write(path, obj):
    if path.suffix == ".safetensors":
        save_file(obj if isinstance(obj, dict) else {"vector": obj}, str(path))
    elif path.suffix == ".pt":
        torch.save(obj, path)
    else:
        np.save(path, obj.numpy())
    return path


@pytest.mark.numeric
@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npy"])
def test_single_vector_goes_where_the_user_says(tiny, tmp_path, suffix, bound):
    v = _randn(64, 10)
    path = _write(tmp_path / f"v{suffix}", v)
    with pytest.raises(LoraCompileError, match="--layer"):
        import_vector(path)
    vec = import_vector(path, layer=2, model=tiny)
    assert vec.site == "resid_post" and vec.layers == [2]
    assert import_vector(path, layer=2, site="resid_mid").site == "resid_mid"
    plain = _logits(tiny)
    with add_to_block_output(tiny, {2: v}):
        theirs = _logits(tiny)
    with true_addition(tiny, vec):
        ours = _logits(tiny)
    _assert_same_and_steered(ours, theirs, plain, bound)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npy"])
def test_layers_by_d_matrix_row_l_is_layer_l(tmp_path, suffix):
    rows = torch.stack([_randn(64, s) for s in range(4)])
    vec = import_vector(_write(tmp_path / f"m{suffix}", rows), layers=[1, 3])
    assert vec.layers == [1, 3]
    torch.testing.assert_close(vec.directions[3], rows[3], rtol=0, atol=0)


@pytest.mark.numeric
def test_steering_vectors_decoder_block_is_resid_post(tiny, tmp_path, bound):
    # steering-vectors' SteeringVector(layer_activations, layer_type) as plain data.
    acts = {1: _randn(64, 11), 3: _randn(64, 12)}
    bare = import_vector(_write(tmp_path / "acts.pt", acts))
    full = import_vector(_write(tmp_path / "sv.pt", {"layer_activations": acts, "layer_type": "decoder_block"}))
    assert bare.layers == full.layers == [1, 3] and bare.site == full.site == "resid_post"
    assert full.metadata["method"] == "steering-vectors"
    plain = _logits(tiny)
    with add_to_block_output(tiny, acts):
        theirs = _logits(tiny)
    with true_addition(tiny, full):
        ours = _logits(tiny)
    _assert_same_and_steered(ours, theirs, plain, bound)
    with pytest.raises(LoraCompileError, match="layer_type 'self_attn'"):
        import_vector(_write(tmp_path / "sa.pt", {"layer_activations": acts, "layer_type": "self_attn"}))


def test_our_own_file_passes_through(tmp_path):
    path = save_vector(
        SteeringVector({5: _randn(64, 13)}, "resid_mid", {"method": "mean_diff"}), tmp_path / "o.safetensors"
    )
    vec = import_vector(path)
    assert vec.site == "resid_mid" and vec.layers == [5] and vec.metadata["method"] == "mean_diff"
    with pytest.raises(LoraCompileError, match="drop --site"):
        import_vector(path, site="resid_post")


# ---- SAE decoder rows ------------------------------------------------------------------------


@pytest.mark.numeric
def test_sae_row_orientation(tiny, tmp_path, bound):
    w_dec = torch.randn(200, 64, generator=torch.Generator().manual_seed(14))  # SAELens: [features, d]
    path = _write(tmp_path / "sae.safetensors", {"W_dec": w_dec, "W_enc": w_dec.T.contiguous()})
    vec = import_vector(f"{path}:W_dec[123]", layer=2, model=tiny)
    torch.testing.assert_close(vec.directions[2], w_dec[123], rtol=0, atol=0)
    assert vec.metadata["source"] == "sae.safetensors:W_dec[123]" and "hidden size 64" in vec.metadata["orientation"]
    # The transposed layout [d, features] (a torch Linear decoder weight) gives the same feature.
    for model in (tiny, None):
        t = import_vector(f"{path}:W_enc[123]", layer=2, model=model)
        torch.testing.assert_close(t.directions[2], w_dec[123], rtol=0, atol=0)
    plain = _logits(tiny)
    with add_to_block_output(tiny, {2: 5 * w_dec[123]}):
        theirs = _logits(tiny)
    with true_addition(tiny, vec, coef=5.0):
        ours = _logits(tiny)
    _assert_same_and_steered(ours, theirs, plain, bound)


# ---- bad input: one line, nothing written ------------------------------------------------------


@pytest.fixture()
def bad_files(tmp_path, tiny_dir):
    d = tmp_path / "in"
    d.mkdir()
    _gguf(d / "d32.gguf", {"direction.1": np.ones(32, np.float32)})
    _gguf(d / "empty.gguf", {"other": np.ones(64, np.float32)})
    _gguf(d / "int.gguf", {"direction.1": np.ones(64, np.int32)})
    (d / "junk.gguf").write_bytes(b"not a gguf file at all")
    save_file({"v": torch.ones(64, dtype=torch.int64)}, str(d / "int.safetensors"))
    save_file({"W_dec": torch.randn(100, 50)}, str(d / "sae.safetensors"))
    (d / "nodirs.svec").write_text(json.dumps({"model_type": "llama", "explained_variances": {}}))
    _svec(d / "v.svec", {2: torch.ones(64)})
    torch.save({"a": torch.ones(64), "b": torch.ones(64)}, d / "two.pt")
    (d / "v.txt").write_text("1 2 3")
    np.save(d / "nan.npy", np.array([1.0, np.nan, 2.0], np.float32))
    save_vector(SteeringVector({1: torch.ones(64)}, "resid_mid"), d / "mid.safetensors")
    return d


@pytest.mark.parametrize(
    "args, match",
    [
        (["import", "{d}/d32.gguf", "--model", "{tiny}"], "hidden size 64"),
        (["import", "{model_gguf}"], "general.architecture='llama'"),
        (["import", "{d}/empty.gguf"], "no direction.N tensors"),
        (["import", "{d}/int.gguf"], "type I32"),
        (["import", "{d}/junk.gguf"], "not a readable GGUF file"),
        (["import", "{d}/int.safetensors", "--layer", "1"], "floating point"),
        (["import", "{d}/sae.safetensors:W_dec[100]", "--layer", "1"], "out of range"),
        (["import", "{d}/sae.safetensors:W_dec[x]", "--layer", "1"], "bad index [x]"),
        (["import", "{d}/sae.safetensors:W_enc[1]", "--layer", "1"], "no tensor 'W_enc'"),
        (["import", "{d}/sae.safetensors:W_dec[1]", "--layer", "1", "--model", "{tiny}"], "fits neither"),
        (["import", "{d}/missing.gguf"], "does not exist"),
        (["import", "{d}/nodirs.svec"], "no 'directions'"),
        (["import", "{d}/v.svec", "--layer", "3"], "--layer: not for svec"),
        (["import", "{d}/two.pt", "--layer", "3"], "FILE:KEY"),
        (["import", "{d}/v.txt"], "--format"),
        (["import", "{d}/nan.npy", "--layer", "1"], "NaN"),
        (["import", "{d}/d32.gguf", "--model", "{tiny}", "--layers", "5"], "no direction for layer(s) [5]"),
    ],
)
def test_bad_input_one_line_nothing_written(bad_files, tiny_dir, args, match):
    fill = {"d": bad_files, "tiny": tiny_dir, "model_gguf": embedded_model_path()}
    out = bad_files.parent / ("out.gguf" if args[0] == "export" else "out.safetensors")
    before = sorted(p.name for p in bad_files.parent.rglob("*"))
    result = runner.invoke(app, [a.format(**fill) for a in args] + ["-o", str(out)])
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert sorted(p.name for p in bad_files.parent.rglob("*")) == before


def test_cli_import_then_export_round_trip(tmp_path):
    src = _gguf(tmp_path / "cv.gguf", {f"direction.{k}": _randn(64, k).numpy() for k in (1, 2)}, count_type="uint32")
    ok = runner.invoke(app, ["import", str(src), "-o", str(tmp_path / "v.safetensors")])
    assert ok.exit_code == 0, ok.output
    assert "resid_post 1, resid_post 2" in ok.output
    ok = runner.invoke(app, ["export", str(tmp_path / "v.safetensors"), "-o", str(tmp_path / "back.gguf")])
    assert ok.exit_code == 0, ok.output
    back = read_vector(tmp_path / "back.gguf")
    for k in (1, 2):
        torch.testing.assert_close(back.directions[k], _randn(64, k), rtol=0, atol=0)
    again = runner.invoke(app, ["import", str(src), "-o", str(tmp_path / "v2.safetensors")])
    assert again.exit_code == 0
    ours = runner.invoke(app, ["import", str(tmp_path / "v.safetensors"), "-o", str(tmp_path / "v3.safetensors")])
    assert ours.exit_code == 0 and "resid_post 1, resid_post 2" in ours.output, ours.output
    assert (tmp_path / "v2.safetensors").read_bytes() == (tmp_path / "v.safetensors").read_bytes()
