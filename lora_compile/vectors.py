"""Steering-vector files and extraction from contrast pairs.

Our vector file is safetensors with float32 tensors ``direction.N`` and string
metadata. ``direction.N`` has the llama.cpp / repeng meaning: it is added to the
output of decoder block N, i.e. ``hidden_states[N+1]`` = ``resid_post N``
(DESIGN §4). ``site`` metadata may say otherwise: ``resid_mid``, or ``resid_pre``
where ``direction.0`` is added to the input of layer 0 (the embedding output).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .architectures import SITES
from .corpus import read_jsonl
from .errors import LoraCompileError
from .models import LoadedModel
from .outputs import atomic_file
from .progress import track

_KEY = re.compile(r"^direction\.(\d+)$")


@dataclass
class SteeringVector:
    """Vectors to add at one site, per layer."""

    directions: dict[int, torch.Tensor]
    site: str = "resid_post"
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    def select(self, layers: list[int] | None) -> SteeringVector:
        if not layers:
            return self
        missing = [layer for layer in layers if layer not in self.directions]
        if missing:
            raise LoraCompileError(f"the vector has no direction for layer(s) {missing}; it has layers {self.layers}")
        return SteeringVector({k: self.directions[k] for k in layers}, self.site, dict(self.metadata))

    def validate(self, loaded: LoadedModel) -> None:
        """Refuse vectors that do not fit the model: wrong size, bad layer, NaN/inf."""
        if not self.directions:
            raise LoraCompileError("the vector file holds no direction.N tensors")
        for layer, vec in self.directions.items():
            loaded.check_layer(layer)
            loaded.arch.site_at(self.site, layer)
            if vec.ndim != 1 or vec.numel() != loaded.hidden_size:
                raise LoraCompileError(
                    f"direction.{layer} has shape {tuple(vec.shape)} but {loaded.name} has hidden size "
                    f"{loaded.hidden_size}: use a vector made for this model"
                )
            if not torch.isfinite(vec).all():
                raise LoraCompileError(f"direction.{layer} contains NaN or infinite values: fix the vector")


def save_vector(vector: SteeringVector, path: str | Path, force: bool = False) -> Path:
    meta = {**vector.metadata, "site": vector.site}
    tensors = {
        f"direction.{k}": v.detach().to(torch.float32).contiguous() for k, v in sorted(vector.directions.items())
    }
    with atomic_file(path, force) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in sorted(meta.items())})
    return Path(path)


def load_vector(path: str | Path) -> SteeringVector:
    path = Path(path)
    if not path.is_file():
        raise LoraCompileError(f"vector file {path} does not exist: pass a .safetensors file with direction.N tensors")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraCompileError(f"{path} is not a readable safetensors file ({exc})") from exc
    directions = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            continue
        if not value.is_floating_point():
            raise LoraCompileError(f"{path}: {key} has dtype {value.dtype}; steering vectors must be floating point")
        directions[int(m.group(1))] = value.to(torch.float32)
    if not directions:
        raise LoraCompileError(f"{path} holds no direction.N tensors: it is not a steering-vector file")
    site = metadata.pop("site", "resid_post")
    if site not in SITES:
        raise LoraCompileError(f"{path}: unknown site {site!r} in metadata; expected one of {', '.join(SITES)}")
    return SteeringVector(directions, site, metadata)


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise LoraCompileError(f"pairs file {path} does not exist: pass a .jsonl of {{positive, negative}} objects")
    pairs = []
    for where, rec in read_jsonl(path):
        if not (isinstance(rec.get("positive"), str) and isinstance(rec.get("negative"), str)):
            raise LoraCompileError(f"{where}: each line needs string fields 'positive' and 'negative'")
        pairs.append((rec["positive"], rec["negative"]))
    if not pairs:
        raise LoraCompileError(f"{path} holds no contrast pairs")
    return pairs


def _last_token_states(
    loaded: LoadedModel, texts: list[str], layers: list[int], batch_size: int = 16
) -> dict[int, torch.Tensor]:
    """``hidden_states[L+1]`` (resid_post L) at each text's last token."""
    tok = loaded.tokenizer
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        for start in track(range(0, len(texts), batch_size), "reading activations", total=-(-len(texts) // batch_size)):
            enc = tok(texts[start : start + batch_size], return_tensors="pt", padding=True)
            with torch.no_grad():
                hs = loaded.model(**enc.to(loaded.device), output_hidden_states=True, use_cache=False).hidden_states
            last = enc["attention_mask"].sum(1) - 1
            rows = torch.arange(last.numel())
            for layer in layers:
                out[layer].append(hs[layer + 1][rows, last].float().cpu())
    finally:
        tok.padding_side = side
    return {layer: torch.cat(v) for layer, v in out.items()}


def extract(loaded: LoadedModel, pairs: list[tuple[str, str]], layers: list[int]) -> SteeringVector:
    """Difference of means over contrast pairs at ``resid_post L``, last token.

    Sign: positive texts project higher along the vector.
    """
    for layer in layers:
        loaded.check_layer(layer)
    positive = _last_token_states(loaded, [p for p, _ in pairs], layers)
    negative = _last_token_states(loaded, [n for _, n in pairs], layers)
    directions = {layer: (positive[layer].mean(0) - negative[layer].mean(0)) for layer in layers}
    return SteeringVector(
        directions,
        site="resid_post",
        metadata={"model": loaded.model_id, "method": "mean_diff", "token": "last", "pairs": str(len(pairs))},
    )
