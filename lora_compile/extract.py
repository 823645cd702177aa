"""Steering vectors from contrast pairs: read the pairs, read hidden states, reduce them.

A contrast pair is a positive and a negative text that differ in the behaviour to
steer (happy/sad, answer A/B). Activations are read at ``resid_post L``, the output
of decoder block L (where ``direction.L`` is added, DESIGN §4). For L < last this
is ``hidden_states[L+1]`` of Hugging Face; for the last block it is the block's
output before the final norm, which HF's last hidden state has applied.

Methods, with ``d_i = pos_i − neg_i`` the pair differences:

- ``mean_diff``: mean of ``d_i`` (difference of means, CAA / ActAdd).
- ``pca_diff``: repeng's ``pca_diff``: the first principal component of the ``d_i``.
  repeng fits ``sklearn.decomposition.PCA``, which centres its input, so this is
  the top axis of the ``d_i`` *after subtracting their mean*.
- ``pca_center``: repeng's ``pca_center``: the first principal component of every
  pair's two activations after subtracting that pair's mean (i.e. of ``±d_i/2``,
  uncentred PCA of the differences).

A principal axis ``u`` has no sign or scale; the vector is ``(mean_i d_i·u) u``,
the mean pair difference along the axis. That fixes the sign (positive texts
project higher on average) and keeps coefficients comparable across methods
(repeng stores unit vectors instead).

Positions: ``last`` (last token of each text), ``mean`` (mean over the text's
tokens, padding excluded) and ``answer`` (the CAA convention: the pair's shared
prompt becomes the user turn of the chat template, the differing completion the
start of the assistant turn, left open; the activation is read at the
completion's last token, i.e. the answer letter or word).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .calibrate import stream_captured
from .corpus import read_jsonl, read_samples
from .errors import LoraCompileError
from .models import LoadedModel
from .progress import stderr
from .vectors import SteeringVector

METHODS = ("mean_diff", "pca_diff", "pca_center")
POSITIONS = ("last", "mean", "answer")
MIN_PAIRS = 32  # fewer pairs give noisy directions: warn


@dataclass(frozen=True)
class ContrastPair:
    """Two texts that differ in one behaviour, optionally with the prompt they share.

    Without an explicit ``prompt`` the shared prompt is the texts' longest common
    prefix, cut back to a whitespace boundary (so both completions start at a word);
    the completions are what follows it.
    """

    positive: str
    negative: str
    prompt: str | None = None

    def split(self) -> tuple[str, str, str]:
        """(shared prompt, positive completion, negative completion)."""
        if self.prompt is not None:
            return self.prompt, self.positive, self.negative
        common = 0
        for a, b in zip(self.positive, self.negative):
            if a != b:
                break
            common += 1
        cut = max((i for i in range(common) if self.positive[i].isspace()), default=0)
        return self.positive[:cut], self.positive[cut:], self.negative[cut:]

    def context_ids(self, tokenizer, chat: bool) -> list[int]:
        """Token ids of the shared prompt: plain text, or a chat user turn opening the assistant turn."""
        prompt = self.split()[0]
        if chat:
            rendered = chat_prefix(tokenizer, prompt)
            return tokenizer(rendered, add_special_tokens=False)["input_ids"]
        return tokenizer(prompt)["input_ids"] if prompt else []


def chat_prefix(tokenizer, user: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise LoraCompileError("position 'answer' needs a chat model (a tokenizer with a chat template)")
    chat = [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def _checked_pair(positive: str, negative: str, prompt: str | None, where: str) -> ContrastPair:
    if not positive.strip() or not negative.strip():
        raise LoraCompileError(f"{where}: positive and negative texts must not be empty")
    if positive == negative:
        raise LoraCompileError(f"{where}: the positive and negative texts are identical; a pair must differ")
    return ContrastPair(positive, negative, prompt)


def read_pairs(path: str | Path) -> list[ContrastPair]:
    """A ``.jsonl`` of ``{"positive", "negative"}`` objects, each optionally with a shared ``"prompt"``."""
    path = Path(path)
    if not path.is_file():
        raise LoraCompileError(f"pairs file {path} does not exist: pass a .jsonl of {{positive, negative}} objects")
    pairs = []
    for where, rec in read_jsonl(path):
        if not (isinstance(rec.get("positive"), str) and isinstance(rec.get("negative"), str)):
            raise LoraCompileError(f"{where}: each line needs string fields 'positive' and 'negative'")
        prompt = rec.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise LoraCompileError(f"{where}: 'prompt' must be a string")
        pairs.append(_checked_pair(rec["positive"], rec["negative"], prompt, where))
    if not pairs:
        raise LoraCompileError(f"{path} holds no contrast pairs")
    return pairs


def read_texts(path: str | Path) -> list[str]:
    """Texts of one side of the pairs.

    ``.jsonl``: ``text`` records (the project's convention). Other files: split at
    blank lines where the file has any (the project's ``.txt`` convention), else
    one text per line.
    """
    path = Path(path)
    if not path.is_file():
        raise LoraCompileError(f"text file {path} does not exist: pass a .txt (one text per line) or .jsonl file")
    if path.suffix == ".jsonl":
        texts = []
        for where, rec in read_jsonl(path):
            if not isinstance(rec.get("text"), str):
                raise LoraCompileError(f"{where}: contrast texts need a 'text' string in each record")
            texts.append(rec["text"])
    else:
        raw = path.read_text(encoding="utf-8").strip()
        if re.search(r"\n[ \t]*\n", raw):
            texts = [s.text or "" for s in read_samples(path)]
        else:
            texts = [line.strip() for line in raw.splitlines() if line.strip()]
    if not texts:
        raise LoraCompileError(f"{path} holds no text: give one text per line")
    return texts


def read_contrast_texts(positive: str | Path, negative: str | Path) -> list[ContrastPair]:
    """Pairs from two files, matched in order: the i-th positive with the i-th negative."""
    pos, neg = read_texts(positive), read_texts(negative)
    if len(pos) != len(neg):
        raise LoraCompileError(
            f"{positive} has {len(pos)} texts but {negative} has {len(neg)}: the files must pair text by text"
        )
    return [_checked_pair(p, n, None, f"{positive} / {negative} text {i}") for i, (p, n) in enumerate(zip(pos, neg), 1)]


def check_options(method: str, position: str) -> None:
    if method not in METHODS:
        raise LoraCompileError(f"unknown extraction method {method!r}: use one of {', '.join(METHODS)}")
    if position not in POSITIONS:
        raise LoraCompileError(f"unknown token position {position!r}: use one of {', '.join(POSITIONS)}")


def _token_lists(loaded: LoadedModel, pairs: list[ContrastPair], position: str) -> list[list[int]]:
    """Token ids of every pair's positive then negative text (order: p0, n0, p1, n1, ...)."""
    tok = loaded.tokenizer
    out = []
    for pair in pairs:
        if position == "answer":
            context = pair.context_ids(tok, chat=True)
            completions = pair.split()[1:]
            out += [context + tok(c.lstrip(), add_special_tokens=False)["input_ids"] for c in completions]
        else:
            out += [tok(text)["input_ids"] for text in (pair.positive, pair.negative)]
    return out


def read_states(
    loaded: LoadedModel, token_lists: list[list[int]], layers: list[int], pool: str = "last"
) -> dict[int, torch.Tensor]:
    """``resid_post L`` (output of decoder block L) per text: at its last token or averaged over its tokens.

    Batches are right-padded (padding after the text never changes its activations
    under causal attention) and the forward stops after the deepest layer.
    """
    states = {layer: torch.zeros(len(token_lists), loaded.hidden_size, dtype=torch.float64) for layer in layers}
    blocks = {layer: loaded.arch.layer_module(layer) for layer in layers}
    captures = stream_captured(loaded, token_lists, max(layers), (), list(blocks.values()), "reading activations")
    for batch, mask, captured in captures:
        for layer, block in blocks.items():
            h = captured[block].double().cpu()
            if pool == "mean":
                states[layer][batch] = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            else:
                states[layer][batch] = h[torch.arange(len(batch)), mask.sum(1) - 1]
    return states


def _top_axis(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svd(x, full_matrices=False).Vh[0]


def direction_from_states(positive: torch.Tensor, negative: torch.Tensor, method: str) -> torch.Tensor:
    """The steering vector from paired activations ``[n, d]`` (see the module notes for each method)."""
    diff = positive - negative
    mean = diff.mean(0)
    if method == "mean_diff":
        return mean
    if method == "pca_diff":
        axis = _top_axis(diff - mean)
    else:  # pca_center: each pair minus its own mean is ±diff/2; PCA centres the whole set (mean 0 here)
        centred = torch.cat([diff / 2, -diff / 2])
        axis = _top_axis(centred - centred.mean(0))
    return (mean @ axis) * axis


def separability(positive: torch.Tensor, negative: torch.Tensor, direction: torch.Tensor) -> dict[str, float]:
    """How well the direction separates the pairs it came from (in-sample).

    ``gap_over_std``: mean projection gap (positive − negative) over the pooled std
    of the projections of each side; ``ordered``: fraction of pairs whose positive
    text projects higher.
    """
    unit = direction / direction.norm().clamp_min(1e-30)
    p, n = positive @ unit, negative @ unit
    gap = float((p - n).mean())
    pooled = float(((p.var() + n.var()) / 2).sqrt())
    return {
        "gap_over_std": round(gap / max(pooled, 1e-30), 4),
        "ordered": round(float((p > n).double().mean()), 4),
        "gap": round(gap, 4),
        "pooled_std": round(pooled, 4),
    }


def extract(
    loaded: LoadedModel,
    pairs: list[ContrastPair],
    layers: list[int],
    method: str = "mean_diff",
    position: str = "last",
) -> SteeringVector:
    """A steering vector at ``resid_post L`` for every layer, from contrast pairs, in one pass.

    Sign: positive texts project higher along the vector. Per-layer separability
    goes into the metadata (``SteeringVector.separability``).
    """
    check_options(method, position)
    layers = sorted(set(layers))
    if not layers:
        raise LoraCompileError("no layers given: pass the layer(s) to read, e.g. 18 or 10-20")
    for layer in layers:
        loaded.check_layer(layer)
    if len(pairs) < 2:
        raise LoraCompileError(f"{len(pairs)} contrast pair(s) given: at least 2 are needed (32 or more recommended)")
    if len(pairs) < MIN_PAIRS:
        stderr.print(
            f"[yellow]warning:[/yellow] only {len(pairs)} contrast pairs; directions from fewer than "
            f"{MIN_PAIRS} are noisy",
            highlight=False,
        )
    pool = "mean" if position == "mean" else "last"
    states = read_states(loaded, _token_lists(loaded, pairs, position), layers, pool)
    directions, report = {}, {}
    for layer in layers:
        positive, negative = states[layer][0::2], states[layer][1::2]
        vec = direction_from_states(positive, negative, method)
        directions[layer] = vec.float()
        report[str(layer)] = separability(positive, negative, vec)
    metadata = {
        "model": loaded.model_id,
        "method": method,
        "position": position,
        "pairs": str(len(pairs)),
        "separability": json.dumps(report, separators=(",", ":")),
    }
    return SteeringVector(directions, site="resid_post", metadata=metadata)
