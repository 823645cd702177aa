"""Steering-vector files: safetensors ``direction.N`` tensors with string metadata.

Our vector file is safetensors with float32 tensors ``direction.N`` and string
metadata. ``direction.N`` has the llama.cpp / repeng meaning: it is added to the
output of decoder block N, i.e. ``hidden_states[N+1]`` = ``resid_post N``
(DESIGN §4). ``site`` metadata may say otherwise: ``resid_mid``, or ``resid_pre``
where ``direction.0`` is added to the input of layer 0 (the embedding output).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from .architectures import SITES
from .errors import LoraCompileError
from .models import LoadedModel
from .outputs import atomic_file, save_safetensors

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

    @property
    def separability(self) -> dict[int, dict[str, float]]:
        """Per layer, how well the direction separated its contrast pairs (set by extraction)."""
        raw = self.metadata.get("separability")
        return {int(k): v for k, v in json.loads(raw).items()} if raw else {}

    def select(self, layers: list[int] | None) -> SteeringVector:
        if not layers:
            return self
        missing = [layer for layer in layers if layer not in self.directions]
        if missing:
            raise LoraCompileError(f"the vector has no direction for layer(s) {missing}; it has layers {self.layers}")
        return SteeringVector({k: self.directions[k] for k in layers}, self.site, dict(self.metadata))

    def check_values(self, where: str | None = None) -> None:
        """Refuse NaN/inf, and vectors whose squared norm overflows float32 (every norm and balance step needs it)."""
        limit = torch.finfo(torch.float32).max
        where = f"{where}: " if where else ""
        for layer, vec in self.directions.items():
            if not torch.isfinite(vec).all():
                raise LoraCompileError(f"{where}direction.{layer} contains NaN or infinite values: fix the vector")
            if float(vec.double().pow(2).sum()) > limit:
                raise LoraCompileError(
                    f"{where}the norm of direction.{layer} overflows float32 (max |value| "
                    f"{float(vec.abs().max()):.3g}): rescale the vector, or use --coef for its strength"
                )

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
        self.check_values()


def save_vector(vector: SteeringVector, path: str | Path, force: bool = False) -> Path:
    meta = {**vector.metadata, "site": vector.site}
    tensors = {
        f"direction.{k}": v.detach().to(torch.float32).contiguous() for k, v in sorted(vector.directions.items())
    }
    with atomic_file(path, force) as tmp:
        save_safetensors(tensors, tmp, {k: str(v) for k, v in meta.items()})
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
