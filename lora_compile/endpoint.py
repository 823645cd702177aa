"""Verify a served adapter over an OpenAI-compatible ``/v1/completions`` endpoint.

The server (vLLM, SGLang, llama.cpp's server, a hosted API) runs the adapter; true addition
of the same vector runs here, on the same base model. A server returns only the top-k
log-probabilities per position, so the comparison is restricted to what it returned:

- KL, per position: both distributions restricted to the server's top-k token set ``S`` and
  renormalised on it, ``KL(p_true|S ‖ q_server|S)``; the unsteered reference is the local
  unsteered model on the same ``S``, ``KL(p_true|S ‖ p_unsteered|S)``; the ratio is of their
  means over tokens, as ``verify`` reports it. ``mass_covered`` says how much of the true
  distribution ``S`` holds (near 1: the restriction loses little).
- top-1 agreement: the server's most likely token against true addition's.
- greedy agreement: the server's greedy completion (temperature 0) against true addition's,
  in leading tokens that agree.

Tokens are matched by their text (servers return token strings): the local probability of a
string is the sum over the token ids that decode to it. Prompts are sent as text and the
server's echo is checked against the local tokenisation; prompts it tokenised differently are
left out and counted. Servers differ in which position an echoed log-probability belongs to
(OpenAI: the entry at token i predicts token i; llama-cpp-python: the distribution after token
i); the alignment is detected from the data (the one under which the server agrees with true
addition) and reported. The API key is read from an environment variable and only ever sent
in the Authorization header: never printed, logged or written.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .calibrate import encode
from .corpus import Sample
from .errors import LoraCompileError
from .models import LoadedModel
from .progress import track
from .vectors import SteeringVector
from .verify import VERIFY_MAX_TOKENS, agreement, greedy, true_addition

API_KEY_ENVS = ("LORA_COMPILE_API_KEY", "OPENAI_API_KEY")
DEFAULT_TOP_K = 20
DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRIES = 3
MAX_BACKOFF = 8.0
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
ALIGNMENTS = ("auto", "next-token", "shifted")
NO_LOGPROBS_HINT = (
    "verify --endpoint needs top-k logprobs with echo from /v1/completions "
    "(llama.cpp's server: logits_all=true; vLLM: --max-logprobs)"
)


def api_key(env: str | None = None) -> str | None:
    """The API key from ``env`` if named (it must then be set), else the first of API_KEY_ENVS that is set."""
    if env is not None:
        if not os.environ.get(env):
            raise LoraCompileError(f"--api-key-env {env}: that environment variable is not set")
        return os.environ[env]
    return next((os.environ[e] for e in API_KEY_ENVS if os.environ.get(e)), None)


def base_url(url: str) -> str:
    """``http://host:port`` or ``…/v1`` (with or without a trailing slash) as the ``…/v1`` base."""
    if not url.startswith(("http://", "https://")):
        raise LoraCompileError(f"--endpoint {url!r}: give an http:// or https:// URL, e.g. http://127.0.0.1:8000/v1")
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class EndpointClient:
    """A small OpenAI-compatible client: JSON over HTTP, timeouts, bounded retries with backoff."""

    def __init__(
        self,
        url: str,
        key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = 0.5,
    ):
        self.url = base_url(url)
        self._key = key
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.requests = 0

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _fail(self, status: int, detail: str) -> LoraCompileError:
        if status in (401, 403):
            named = " or ".join(API_KEY_ENVS)
            return LoraCompileError(
                f"{self.url} refused the request (HTTP {status}, {detail}): set {named} (or --api-key-env) "
                "to a key this server accepts"
            )
        return LoraCompileError(f"{self.url} answered HTTP {status}: {detail}")

    def request(self, path: str, body: dict | None = None) -> dict:
        """GET (no body) or POST JSON; retries connection failures, timeouts, 429 and 5xx with backoff."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        data = None if body is None else json.dumps(body).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF))
            self.requests += 1
            req = urllib.request.Request(self.url + path, data=data, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode() or "{}")
            except urllib.error.HTTPError as exc:
                detail = _error_detail(exc)
                if "logprob" in detail.lower():  # e.g. llama-cpp-python without logits_all: asking again won't help
                    raise LoraCompileError(
                        f"{self.url} returned no logprobs ({self._redact(detail)}): {NO_LOGPROBS_HINT}"
                    ) from None
                if exc.code not in RETRY_STATUS:
                    raise self._fail(exc.code, self._redact(detail)) from None
                last = f"HTTP {exc.code}: {self._redact(detail)}"
            except TimeoutError:
                last = f"no answer within {self.timeout:g} s"
            except urllib.error.URLError as exc:
                reason = exc.reason
                last = f"no answer within {self.timeout:g} s" if isinstance(reason, TimeoutError) else str(reason)
            except (ConnectionError, json.JSONDecodeError) as exc:
                last = str(exc) or type(exc).__name__
        raise LoraCompileError(
            f"cannot get an answer from {self.url}{path} after {self.retries + 1} attempts ({last}): check the URL "
            "and that the server is up, or raise --timeout"
        )

    def models(self) -> list[str] | None:
        """The served model names from ``/v1/models``, or None where the server does not list them."""
        try:
            listing = self.request("/models")
        except LoraCompileError as exc:
            if "HTTP 404" in str(exc) or "HTTP 405" in str(exc):
                return None
            raise
        return [m.get("id") for m in listing.get("data", []) if isinstance(m, dict)]

    def completion(self, model: str, prompt: str, max_tokens: int, logprobs: int, echo: bool) -> dict:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "logprobs": logprobs,
            "echo": echo,
        }
        answer = self.request("/completions", body)
        choices = answer.get("choices") or []
        if not choices:
            raise LoraCompileError(f"{self.url} returned no completion choices for model {model!r}")
        return choices[0]


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """The server's own one-line reason, from an OpenAI-style error body where there is one."""
    try:
        payload = json.loads(exc.read().decode() or "{}")
    except (ValueError, OSError):
        payload = {}
    detail = payload.get("detail") or payload.get("error") or payload.get("message") or exc.reason
    if isinstance(detail, dict):
        detail = detail.get("message") or json.dumps(detail)
    return " ".join(str(detail).split())[:200]


@dataclass
class EndpointReport:
    url: str
    served_model: str
    top_k: int  # asked for
    top_k_returned: int  # the fewest entries the server returned at a position
    kl_compiled: float  # mean per token KL(true|S ‖ server|S)
    kl_unsteered: float  # mean per token KL(true|S ‖ local unsteered|S)
    kl_ratio: float
    top1_agreement: float
    mass_covered: float  # mean probability true addition puts on S
    tokens: int
    prompts: int
    alignment: dict[str, int]  # prompts per echo alignment: "next-token" (OpenAI), "shifted" (llama-cpp-python)
    requests: int
    greedy_agreement: float | None = None  # agreeing leading tokens / tokens, over the generations
    not_returned: list[str] = field(default_factory=list)
    generations: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _norm(text: str) -> str:
    # Servers decode a token that is part of a UTF-8 character to '' (errors=ignore), transformers to U+FFFD.
    return text.replace("\ufffd", "")


class _Vocab:
    """Token strings of the local tokenizer, each with the ids that decode to it."""

    def __init__(self, tokenizer):
        strings = [_norm(t) for t in tokenizer.batch_decode([[i] for i in range(len(tokenizer))])]
        self.strings = strings
        self.index: dict[str, list[int]] = {}
        for i, s in enumerate(strings):
            self.index.setdefault(s, []).append(i)

    def logprobs(self, logp: torch.Tensor, keys: list[str]) -> torch.Tensor:
        """log p of each key (summed over its ids); -inf for a string no local token decodes to."""
        out = torch.full((len(keys),), -math.inf, dtype=torch.float64)
        for j, key in enumerate(keys):
            ids = self.index.get(_norm(key))
            if ids:
                out[j] = torch.logsumexp(logp[ids], 0)
        return out


def _restricted_kl(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """KL between two distributions restricted to the same keys and renormalised there."""
    keep = torch.isfinite(logp) & torch.isfinite(logq)
    if not keep.any():
        return math.nan
    p = logp[keep] - torch.logsumexp(logp[keep], 0)
    q = logq[keep] - torch.logsumexp(logq[keep], 0)
    return float((p.exp() * (p - q)).sum())


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / max(len(finite), 1)


def _match(echoed: list[str], ids: list[int], vocab: _Vocab, special: set[int]) -> list[int] | None:
    """The local position of each echoed token (len(ids) for a generated one), or None if they differ.

    Servers may leave special tokens out of the echo (llama-cpp-python drops the BOS id, which is
    SmolLM2's ``<|im_start|>``) or print them as ''; only those may be skipped.
    """
    out, j = [], 0
    for text in echoed:
        text = _norm(text)
        while j < len(ids) and vocab.strings[ids[j]] != text and ids[j] in special and text != "":
            j += 1
        if j < len(ids) and (vocab.strings[ids[j]] == text or (ids[j] in special and text == "")):
            out.append(j)
            j += 1
        elif j == len(ids):
            out.append(j)  # the generated token after the prompt
        else:
            return None
    return out


def _echo(choice: dict, url: str, model: str) -> tuple[list[str], list[dict | None]]:
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict) or not logprobs.get("top_logprobs"):
        raise LoraCompileError(f"{url} returned no logprobs for model {model!r}: {NO_LOGPROBS_HINT}")
    return list(logprobs.get("tokens") or []), list(logprobs["top_logprobs"])


def check_model(client: EndpointClient, served_model: str) -> list[str]:
    """Refuse a model name the server does not list (before any model is loaded here); notes what it lacks.

    Some servers (llama-cpp-python's) answer any name with their default model, so the listing,
    not the completion, is what tells a wrong name.
    """
    served = client.models()
    if served is None:
        return ["/v1/models (the model name could not be checked)"]
    if served_model not in served:
        listed = ", ".join(str(m) for m in served[:10]) or "none"
        raise LoraCompileError(
            f"{client.url} serves no model named {served_model!r} (it serves: {listed}): pass one of those "
            "as --served-model"
        )
    return []


def verify_endpoint(
    client: EndpointClient,
    served_model: str,
    loaded: LoadedModel,
    vector: SteeringVector,
    prompts: list[Sample],
    coef: float = 1.0,
    generation_prompts: list[Sample] | None = None,
    max_new_tokens: int = 32,
    top_k: int = DEFAULT_TOP_K,
    notes: list[str] | None = None,
    alignment: str = "auto",
) -> EndpointReport:
    """Compare what the endpoint returns for ``served_model`` with true addition of ``coef·vector`` here.

    ``notes``: what the server did not return so far (from ``check_model``). ``alignment``: which
    position an echoed entry belongs to, ``next-token`` (OpenAI), ``shifted`` (llama-cpp-python) or
    ``auto``: the one under which the server is closer to true addition (on a trained model the wrong
    one is far off, as it compares the distributions of different positions).
    """
    if alignment not in ALIGNMENTS:
        raise LoraCompileError(f"--echo-alignment {alignment!r}: use one of {', '.join(ALIGNMENTS)}")
    not_returned = list(notes or [])
    vocab = _Vocab(loaded.tokenizer)
    special = set(loaded.tokenizer.all_special_ids)
    token_lists = encode(loaded, prompts, VERIFY_MAX_TOKENS)
    kl_c, kl_u, top1, mass = [], [], [], []
    counts = {"next-token": 0, "shifted": 0}
    mismatched = no_echo = missing_positions = dropped = 0
    fewest: int | None = None
    for ids in track(token_lists, "endpoint requests"):
        choice = client.completion(served_model, loaded.tokenizer.decode(ids), max_tokens=1, logprobs=top_k, echo=True)
        tokens, tops = _echo(choice, client.url, served_model)
        if len(tokens) <= 1:
            no_echo += 1
            continue
        positions = _match(tokens, ids, vocab, special)
        if positions is None:
            mismatched += 1
            continue
        dropped += len(ids) - sum(1 for j in positions if j < len(ids))
        with torch.no_grad():
            inp = torch.tensor([ids], device=loaded.device)
            plain = F.log_softmax(loaded.model(input_ids=inp).logits[0].double().cpu(), -1)
            with true_addition(loaded, vector, coef):
                steered = F.log_softmax(loaded.model(input_ids=inp).logits[0].double().cpu(), -1)
        n = len(ids)
        # next-token (OpenAI): the entry at token j predicts token j, i.e. local row j−1; shifted
        # (llama-cpp-python when it keeps the first token): the entry is the distribution after token j.
        candidates = {
            "next-token": [(top, j - 1) for top, j in zip(tops, positions) if 0 < j <= n],
            "shifted": [(top, j) for top, j in zip(tops, positions) if j < n],
        }
        scored = {}
        for name, pairs in candidates.items():
            rows = []
            for top, row in pairs:
                if not top:
                    continue
                keys = list(top)
                server = torch.tensor([float(top[k]) for k in keys], dtype=torch.float64)
                true_s = vocab.logprobs(steered[row], keys)
                rows.append(
                    (
                        _restricted_kl(true_s, server),
                        _restricted_kl(true_s, vocab.logprobs(plain[row], keys)),
                        _norm(keys[int(server.argmax())]) == vocab.strings[int(steered[row].argmax())],
                        float(torch.logsumexp(true_s[torch.isfinite(true_s)], 0).exp()),
                        len(keys),
                    )
                )
            if rows:
                scored[name] = rows
        if not scored:
            missing_positions += len(tops)
            continue
        # auto: the alignment under which the server is closer to true addition; on a trained model the
        # wrong one compares distributions of different positions and is far off.
        name = alignment if alignment != "auto" else min(scored, key=lambda a: _mean([r[0] for r in scored[a]]))
        rows = scored.get(name) or []
        counts[name] += 1
        missing_positions += len(candidates[name]) - len(rows)
        for c, u, t, m, k in rows:
            kl_c.append(c)
            kl_u.append(u)
            top1.append(t)
            mass.append(m)
            fewest = k if fewest is None else min(fewest, k)
    if not kl_c:
        raise LoraCompileError(
            f"{client.url} echoed none of the {len(token_lists)} prompts as tokenised here "
            f"({no_echo} without prompt echo, {mismatched} tokenised differently): verify --endpoint needs "
            "echo=true with logprobs on /v1/completions and the same base model"
        )
    if no_echo:
        not_returned.append(f"prompt echo for {no_echo} of {len(token_lists)} prompts (left out)")
    if mismatched:
        not_returned.append(f"the local tokenisation for {mismatched} prompts (tokenised differently; left out)")
    if dropped:
        not_returned.append(f"{dropped} special tokens of the prompts in the echo (their positions not compared)")
    if missing_positions:
        not_returned.append(f"top-k logprobs at {missing_positions} positions")
    if fewest is not None and fewest < top_k:
        not_returned.append(f"{top_k} logprobs per position (as few as {fewest} returned)")
    gens, agreeing, total = [], 0, 0
    for sample in track(generation_prompts or [], "greedy generations"):
        ids = sample.token_ids(loaded.tokenizer, VERIFY_MAX_TOKENS, add_generation_prompt=True)
        choice = client.completion(served_model, loaded.tokenizer.decode(ids), max_new_tokens, 1, echo=False)
        server_text = choice.get("text") or ""
        server_ids = loaded.tokenizer(server_text, add_special_tokens=False)["input_ids"]
        with true_addition(loaded, vector, coef):
            true_ids = greedy(loaded.model, loaded, ids, max_new_tokens)
        special = set(loaded.tokenizer.all_special_ids)
        true_ids = [t for t in true_ids if t not in special]
        n_agree = agreement(true_ids, server_ids)
        agreeing, total = agreeing + n_agree, total + len(true_ids)
        decode = loaded.tokenizer.decode
        gens.append(
            {
                "prompt": sample.messages[-1][1] if sample.messages else sample.text,
                "true": decode(true_ids, skip_special_tokens=True),
                "served": server_text,
                "tokens_agreeing": n_agree,
                "tokens": len(true_ids),
            }
        )
    kl_c_mean, kl_u_mean = _mean(kl_c), _mean(kl_u)
    return EndpointReport(
        url=client.url,
        served_model=served_model,
        top_k=top_k,
        top_k_returned=fewest or 0,
        kl_compiled=kl_c_mean,
        kl_unsteered=kl_u_mean,
        kl_ratio=kl_c_mean / max(kl_u_mean, 1e-30),
        top1_agreement=sum(top1) / len(top1),
        mass_covered=_mean(mass),
        tokens=len(kl_c),
        prompts=sum(counts.values()),
        alignment={k: v for k, v in counts.items() if v},
        requests=client.requests,
        greedy_agreement=agreeing / total if total else None,
        not_returned=not_returned,
        generations=gens,
    )
