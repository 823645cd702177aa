"""Coefficient sweep: how behaviour and drift move with the steering strength.

Nothing is compiled: the vector is added with true activation addition
(``verify.true_addition``) at each coefficient, and two numbers are measured.

- Behaviour score (on contrast pairs): the mean over pairs of the log-odds gap
  ``log p(positive completion | prompt) − log p(negative completion | prompt)``,
  each log-probability summed over the completion's tokens. A pair's prompt and
  completions come from ``ContrastPair.split``: an explicit ``prompt`` field (then
  rendered as a chat user turn, the completion being the assistant's answer), or
  the texts' common prefix as plain text (for the shipped happy/sad pairs: "...I
  felt so" | " happy that I" vs " sad that I").
- Drift: the mean per-token KL(steered ‖ unsteered) of the next-token
  distributions, over every token of the prompt set (the pair texts by default).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .calibrate import encode, padded_batches
from .corpus import Sample
from .errors import LoraCompileError
from .extract import ContrastPair
from .models import LoadedModel
from .progress import track
from .vectors import SteeringVector
from .verify import VERIFY_MAX_TOKENS, true_addition

DEFAULT_COEFS = (0.0, 1.0, 2.0, 4.0, 8.0)
# Logits of a batch are [tokens, vocab]: keep batches small enough to hold a few copies.
SWEEP_BATCH_TOKENS = 512


@dataclass
class SweepResult:
    model: str
    site: str
    layers: list[int]
    pairs: int  # pairs scored (0: no behaviour score)
    kl_tokens: int
    rows: list[dict] = field(default_factory=list)  # per coefficient: coef, score, ordered, kl

    def to_dict(self) -> dict:
        return asdict(self)


def check_coefs(coefs: list[float]) -> list[float]:
    if not coefs:
        raise LoraCompileError("no coefficients given: pass e.g. 0,1,2,4,8")
    if not all(math.isfinite(c) for c in coefs):
        raise LoraCompileError(f"coefficients {coefs} include a non-finite number")
    return sorted(set(float(c) for c in coefs))


def _scored_sequences(loaded: LoadedModel, pairs: list[ContrastPair]) -> list[tuple[list[int], int]]:
    """Per pair, positive then negative: (prompt + completion token ids, number of prompt tokens)."""
    tok = loaded.tokenizer
    out = []
    for i, pair in enumerate(pairs, 1):
        chat = pair.prompt is not None
        context = pair.context_ids(tok, chat)
        if not context:
            raise LoraCompileError(
                f"pair {i} has no shared prompt to score completions after: give it a 'prompt' field"
            )
        for completion in pair.split()[1:]:
            ids = tok(completion.lstrip() if chat else completion, add_special_tokens=False)["input_ids"]
            out.append((context + ids, len(context)))
    return out


def _completion_logprob(logp: torch.Tensor, ids: list[int], start: int) -> float:
    """Σ log p(token t | tokens < t) for t ≥ start, from a sequence's next-token log-probabilities."""
    targets = torch.tensor(ids[start:], device=logp.device)
    return float(logp[start - 1 : len(ids) - 1].gather(-1, targets[:, None]).sum())


def _log_probs(loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities at the real (unpadded) tokens, flattened to [tokens, vocab], float64."""
    logits = loaded.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return F.log_softmax(logits[mask.bool()].double(), -1)


def sweep_coefficients(
    loaded: LoadedModel,
    vector: SteeringVector,
    coefs: list[float],
    pairs: list[ContrastPair] | None = None,
    prompts: list[Sample] | None = None,
) -> SweepResult:
    """Behaviour score (if pairs) and KL to unsteered (on prompts, else the pair texts) per coefficient."""
    coefs = check_coefs(coefs)
    if not pairs and not prompts:
        raise LoraCompileError("nothing to measure on: give contrast pairs or prompts")
    scored = _scored_sequences(loaded, pairs) if pairs else []
    # One list of sequences: the scored ones first, then the KL prompts if given (else KL is on the pair texts).
    sequences = [ids for ids, _ in scored] + (encode(loaded, prompts, VERIFY_MAX_TOKENS) if prompts else [])
    kl_rows = set(range(len(scored), len(sequences))) if prompts else set(range(len(scored)))
    gaps = torch.zeros(len(coefs), len(pairs or []), dtype=torch.float64)
    kl_sum = torch.zeros(len(coefs), dtype=torch.float64)
    kl_tokens = 0
    batches = list(padded_batches(sequences, loaded.tokenizer.pad_token_id, SWEEP_BATCH_TOKENS))
    with torch.no_grad():
        for batch, ids, mask in track(batches, "sweeping coefficients"):
            ids, mask = ids.to(loaded.device), mask.to(loaded.device)
            real = mask.bool()
            kl_mask = torch.tensor([i in kl_rows for i in batch], device=mask.device)[:, None].expand_as(real)[real]
            kl_tokens += int(kl_mask.sum())
            plain = _log_probs(loaded, ids, mask)
            offsets = real.sum(1).cumsum(0) - real.sum(1)  # where each row starts in the flattened tokens
            for c, coef in enumerate(coefs):
                with true_addition(loaded, vector, coef):
                    logp = _log_probs(loaded, ids, mask)
                kl_sum[c] += float((logp.exp() * (logp - plain)).sum(-1)[kl_mask].sum())
                for row, i in enumerate(batch):
                    if i < len(scored):
                        seq, start = scored[i]
                        sign = 1.0 if i % 2 == 0 else -1.0  # positive, then negative of each pair
                        rows = logp[offsets[row] : offsets[row] + len(seq)]
                        gaps[c, i // 2] += sign * _completion_logprob(rows, seq, start)
    result = SweepResult(loaded.model_id, vector.site, vector.layers, len(pairs or []), kl_tokens)
    for c, coef in enumerate(coefs):
        result.rows.append(
            {
                "coef": coef,
                "score": float(gaps[c].mean()) if pairs else None,
                "ordered": float((gaps[c] > 0).double().mean()) if pairs else None,
                "kl": float(kl_sum[c] / max(kl_tokens, 1)),
            }
        )
    return result


def plot_sweep(result: SweepResult, path: str | Path) -> Path:
    """Two panels against the coefficient: behaviour score, and KL to unsteered."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coefs = [r["coef"] for r in result.rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8), dpi=120)
    if result.pairs:
        left.plot(coefs, [r["score"] for r in result.rows], "o-", color="tab:green")
        left.axhline(0, color="grey", lw=0.8)
        left.set_ylabel("mean log p(positive) − log p(negative)")
        left.set_title(f"behaviour score ({result.pairs} pairs)", fontsize=10)
    else:
        left.text(0.5, 0.5, "no contrast pairs given", ha="center", va="center", transform=left.transAxes)
        left.set_title("behaviour score", fontsize=10)
    right.plot(coefs, [r["kl"] for r in result.rows], "o-", color="tab:red")
    right.set_ylabel("mean KL(steered ‖ unsteered) per token")
    right.set_title(f"drift ({result.kl_tokens} tokens)", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("coefficient")
        ax.grid(True, alpha=0.3)
    layers = ", ".join(str(x) for x in result.layers)
    fig.suptitle(f"Steering sweep, {result.site} layer(s) {layers}, {result.model}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return Path(path)
