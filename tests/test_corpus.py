import json

import pytest

from lora_compile import corpus
from lora_compile.errors import LoraCompileError


def test_shipped_corpus_is_diverse_and_heldout_domains_are_different():
    cal = corpus.default_calibration()
    held = corpus.default_heldout()
    cal_domains = {s.domain for s in cal}
    held_domains = {s.domain for s in held}
    assert {"encyclopedic", "technical", "lists", "code", "dialogue"} <= cal_domains
    assert {"stories", "poetry", "chat"} <= held_domains
    assert not cal_domains & held_domains
    assert any(s.is_chat for s in cal) and any(s.is_chat for s in held)


def test_chat_samples_render_with_the_template(smol):
    chat = next(s for s in corpus.default_heldout() if s.is_chat)
    ids = chat.token_ids(smol.tokenizer, 512)
    assert ids[: len(smol.fixed_prefix())] == smol.fixed_prefix()


def test_read_samples_text_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("one paragraph\n\nanother one\n")
    assert [s.text for s in corpus.read_samples(txt)] == ["one paragraph", "another one"]
    jl = tmp_path / "b.jsonl"
    jl.write_text(
        json.dumps({"text": "x", "domain": "d"}) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    )
    samples = corpus.read_samples(jl)
    assert samples[0].domain == "d" and samples[1].messages == (("user", "hi"),)


@pytest.mark.parametrize(
    "content, match",
    [("{not json", "not valid JSON"), ('{"foo": 1}', "'text' string or a 'messages' list"), ("[1]", "JSON object")],
)
def test_bad_jsonl_is_refused(tmp_path, content, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(LoraCompileError, match=match):
        corpus.read_samples(p)


def test_missing_text_file(tmp_path):
    with pytest.raises(LoraCompileError, match="does not exist"):
        corpus.read_samples(tmp_path / "missing.txt")


def test_chat_prompts_end_on_a_user_turn():
    prompts = corpus.chat_prompts(corpus.default_calibration())
    assert len(prompts) > 50
    assert all(p.messages[-1][0] == "user" for p in prompts)
