"""Shared fixtures: one real embedded model per session, tiny random models for wiring."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lora_compile import corpus
from lora_compile.calibrate import calibrate
from lora_compile.extract import extract, read_pairs
from lora_compile.models import EMBEDDED_CONFIG, LoadedModel, embedded_model_path, load_model
from lora_compile.scan import site_keys


@pytest.fixture(scope="session")
def smol() -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct, fp32 on CPU (also where CUDA is available: the bounds are CPU-measured)."""
    torch.manual_seed(0)
    return load_model(device="cpu")


@pytest.fixture(scope="session")
def smol_calibration(smol):
    """The shipped calibration corpus at every site and layer, shared by scan, compile and verify."""
    return calibrate(smol, corpus.default_calibration(), site_keys(smol))


@pytest.fixture(scope="session")
def smol_vector(smol):
    return extract(smol, read_pairs(corpus.demo_pairs_path()), [10, 18])


@pytest.fixture(scope="session")
def heldout_subset():
    """A quick held-out prompt set: a few samples of every domain, chat included."""
    samples = corpus.default_heldout()
    out, seen = [], {}
    for s in samples:
        if seen.get(s.domain, 0) < 3:
            out.append(s)
            seen[s.domain] = seen.get(s.domain, 0) + 1
    return out


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The embedded model's tokenizer, for the tiny random models.

    ``LORA_COMPILE_TEST_TOKENIZER`` may name a saved copy (``save_pretrained``): then the tiny-model
    tests run where the embedded GGUF is not installed, e.g. on a GPU machine (scripts/measure_gpu.py).
    """
    from transformers import AutoTokenizer

    saved = os.environ.get("LORA_COMPILE_TEST_TOKENIZER")
    if saved:
        tok = AutoTokenizer.from_pretrained(saved)
    else:
        path = embedded_model_path()
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


SMOL_VOCAB = json.loads(EMBEDDED_CONFIG.read_text())["vocab_size"]


def _save_tiny(path, config, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smol_tokenizer) -> str:
    """A tiny random Llama (4 layers, d=64) saved as a Hugging Face directory."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=SMOL_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=smol_tokenizer.pad_token_id,
    )
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), config, smol_tokenizer)


@pytest.fixture(scope="session")
def tiny(tiny_dir) -> LoadedModel:
    return load_model(tiny_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_tied_dir(tmp_path_factory, smol_tokenizer) -> str:
    """A tiny random Llama whose output head shares the input embedding's weight, like SmolLM2."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=SMOL_VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        pad_token_id=smol_tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return _save_tiny(tmp_path_factory.mktemp("tiny-tied-llama"), config, smol_tokenizer)


@pytest.fixture(scope="session")
def tiny_tied(tiny_tied_dir) -> LoadedModel:
    loaded = load_model(tiny_tied_dir, device="cpu")
    assert loaded.model.get_output_embeddings().weight is loaded.model.get_input_embeddings().weight
    return loaded


@pytest.fixture(scope="session")
def unsupported_dir(tmp_path_factory, smol_tokenizer) -> str:
    """A tiny BLOOM: an architecture the table does not have."""
    from transformers import BloomConfig

    config = BloomConfig(vocab_size=SMOL_VOCAB, hidden_size=32, n_layer=2, n_head=2)
    return _save_tiny(tmp_path_factory.mktemp("tiny-bloom"), config, smol_tokenizer)


class Bounds:
    """Numeric bounds that record what they check.

    ``bound(name, value, limit)`` asserts ``value <= limit`` (``kind="min"``: ``>=``);
    ``bound.close(name, actual, expected, rtol, atol)`` asserts what ``torch.testing.assert_close``
    does and records the fraction of the tolerance used (≤ 1 passes). With ``LORA_COMPILE_BOUNDS``
    naming a file, every checked value is appended to it as a JSON line: ``scripts/measure_kernels.py``
    runs the numeric tests under each CPU kernel choice and shows every bound beside its spread.
    """

    def __init__(self, test: str):
        self.test = test

    def __call__(self, name: str, value: float, limit: float, kind: str = "max") -> None:
        value = float(value)
        path = os.environ.get("LORA_COMPILE_BOUNDS")
        if path:
            with open(path, "a") as f:
                record = {"test": self.test, "name": name, "value": value, "limit": limit, "kind": kind}
                f.write(json.dumps(record) + "\n")
        if kind == "max":
            assert value <= limit, f"{name}: {value:.4g} is above its bound {limit:.4g}"
        else:
            assert value >= limit, f"{name}: {value:.4g} is below its bound {limit:.4g}"

    def close(self, name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
        actual, expected = actual.double(), expected.double().expand_as(actual)
        used = float(((actual - expected).abs() / (atol + rtol * expected.abs())).max())
        self(f"{name} (fraction of rtol={rtol:g}, atol={atol:g})", used, 1.0)


@pytest.fixture
def bound(request) -> Bounds:
    return Bounds(request.node.nodeid.split("::", 1)[-1])
