"""Text the passes run the model on: the shipped corpora, user files, self-generated chats.

A sample is plain text or a chat (a list of ``{"role", "content"}`` messages,
rendered with the model's own chat template). Every sample has a domain, so fit
errors can be reported per kind of text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import LoraCompileError

CALIBRATION_FILES = ("calibration_part_a.jsonl", "calibration_part_b.jsonl")
HELDOUT_FILE = "heldout.jsonl"
DEMO_PAIRS_FILE = "pairs_happy_sad.jsonl"


@dataclass(frozen=True)
class Sample:
    domain: str
    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) pairs

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def render(self, tokenizer, add_generation_prompt: bool = False) -> str:
        if self.messages is None:
            return self.text or ""
        if not getattr(tokenizer, "chat_template", None):
            return "\n\n".join(content for _, content in self.messages)
        chat = [{"role": r, "content": c} for r, c in self.messages]
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)

    def token_ids(self, tokenizer, max_tokens: int, add_generation_prompt: bool = False) -> list[int]:
        """Token ids as the model sees this sample (chat templates carry their own specials)."""
        rendered = self.render(tokenizer, add_generation_prompt)
        ids = tokenizer(rendered, add_special_tokens=not self.is_chat)["input_ids"]
        return ids[:max_tokens]


def _sample_from_record(record: dict, where: str, default_domain: str) -> Sample:
    domain = str(record.get("domain", default_domain))
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in msgs):
            raise LoraCompileError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        return Sample(domain, messages=tuple((str(m["role"]), str(m["content"])) for m in msgs))
    if "text" in record and isinstance(record["text"], str):
        return Sample(domain, text=record["text"])
    raise LoraCompileError(f"{where}: each record needs a 'text' string or a 'messages' list")


def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """The JSON objects of a ``.jsonl`` file, each with its ``file:line`` for error messages."""
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LoraCompileError(f"{path}:{i}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise LoraCompileError(f"{path}:{i}: each line must be a JSON object")
        records.append((f"{path}:{i}", record))
    return records


def read_samples(path: str | Path, domain: str | None = None) -> list[Sample]:
    """Read a ``.jsonl`` file (``text`` or ``messages`` records) or a plain text file.

    A plain text file is split into samples at blank lines.
    """
    path = Path(path)
    if not path.is_file():
        raise LoraCompileError(f"text file {path} does not exist: pass an existing .txt or .jsonl file")
    default_domain = domain or path.stem
    if path.suffix == ".jsonl":
        samples = [_sample_from_record(record, where, default_domain) for where, record in read_jsonl(path)]
    else:
        text = path.read_text(encoding="utf-8")
        samples = [Sample(default_domain, text=p.strip()) for p in text.split("\n\n") if p.strip()]
    if not samples:
        raise LoraCompileError(f"{path} holds no text: give it at least one non-empty sample")
    return samples


def _packaged(name: str) -> Path:
    return Path(str(resources.files("lora_compile") / "data" / name))


def default_calibration() -> list[Sample]:
    """The shipped calibration corpus: encyclopedic, technical, lists, reviews, code, chats."""
    return [s for name in CALIBRATION_FILES for s in read_samples(_packaged(name))]


def default_heldout() -> list[Sample]:
    """Shipped held-out text in domains the calibration corpus does not have.

    Stories, news/letters/recipes, poetry and chat prompts: fit errors measured
    here tell how the compiled steering holds on text unlike the calibration text.
    """
    return read_samples(_packaged(HELDOUT_FILE))


def demo_pairs_path() -> Path:
    return _packaged(DEMO_PAIRS_FILE)


def load_texts(sources: list[str | Path | Sample] | None, default: list[Sample]) -> list[Sample]:
    """Samples from files (or given as samples), else ``default``."""
    if not sources:
        return default
    return [s for src in sources for s in ([src] if isinstance(src, Sample) else read_samples(src))]


def chat_prompts(samples: list[Sample]) -> list[Sample]:
    """User-turn prompts, as chats ending at the first user message, drawn from samples.

    Chats give their first user message; plain text gives a request built on its
    first sentence, so prompts span the corpus's subjects.
    """
    prompts = []
    for s in samples:
        if s.messages is not None:
            head = []
            for role, content in s.messages:
                head.append((role, content))
                if role == "user":
                    prompts.append(Sample(s.domain, messages=tuple(head)))
                    break
        elif s.text:
            first = s.text.strip().split("\n")[0].split(". ")[0][:200]
            prompts.append(Sample(s.domain, messages=(("user", f"Tell me more about this: {first}"),)))
    return prompts
