"""Moments files: calibrate once, compile many vectors (``calibrate -o``, ``compile/scan --moments``).

A safetensors file of a calibration's exact integer sums (``calibrate.ExactMoments``) per site:
``SITE.LAYER.gram`` / ``.total`` (all tokens) and ``.odd_gram`` / ``.odd_total`` (the
odd-numbered samples: the cross-validation fold that chooses the ridge λ), int64 on the grid of
``.exponents`` (with ``.count_exponent``); ``.pinned`` (float64) holds the inputs at the fixed
prefix positions. That is all a fit needs; the held-out error pass runs the model on held-out
text at compile time, so it needs no stored activations.

The JSON header (``lora_compile`` in the safetensors metadata) records the model's fingerprint
(``model_fingerprint``: its weights, not just its name), the sites and layers, token counts,
the corpus hash (of the calibration token ids and batching) and the shard of its batches, and
the dtype and device used. Shards of one calibration (``calibrate --shard i/N``) combine by
integer addition, exactly: N shards give the bits of one run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .calibrate import ExactCalibration, ExactMoments, FixedPointScale, SiteKey, site_device
from .errors import LoraCompileError
from .models import LoadedModel

FORMAT = "lora_compile.moments/1"
HEADER = "lora_compile"
# Values of each weight tensor hashed into the fingerprint, rounded to bfloat16 so that a float32
# and a bfloat16 load of one checkpoint (or a GGUF and its dequantised copy) are the same model.
FINGERPRINT_SAMPLES = 257


def model_fingerprint(loaded: LoadedModel) -> str:
    """sha256 over every weight's name, shape and a fixed spread of its values (as bfloat16)."""
    h = hashlib.sha256(loaded.model.config.model_type.encode())
    for name, p in sorted(loaded.model.state_dict().items()):
        flat = p.detach().reshape(-1)
        index = torch.linspace(0, flat.numel() - 1, min(FINGERPRINT_SAMPLES, flat.numel())).long()
        values = flat[index.to(flat.device)].to(torch.bfloat16).view(torch.int16).cpu()
        h.update(f"{name}:{tuple(p.shape)};".encode())
        h.update(values.numpy().tobytes())
    return h.hexdigest()[:32]


def _name(key: SiteKey, part: str) -> str:
    return f"{key[0]}.{key[1]}.{part}"


def group_paths(out: str | Path, groups: list[list[int]]) -> list[Path]:
    """Where ``calibrate -o out`` writes each layer group: ``out`` itself for one group, else
    ``out``'s name with the group's layers (``m.safetensors`` → ``m.layers-0-13.safetensors``), or
    its place where the layers are not a range (``m.group-1-of-5.safetensors``)."""
    out = Path(out)
    if len(groups) == 1:
        return [out]
    # A split model's groups take layers from every GPU: not a range, named by their place.
    return [
        out.with_name(f"{out.stem}.layers-{g[0]}-{g[-1]}{out.suffix}")
        if g == list(range(g[0], g[-1] + 1))
        else out.with_name(f"{out.stem}.group-{i + 1}-of-{len(groups)}{out.suffix}")
        for i, g in enumerate(groups)
    ]


def save_moments(
    exact: ExactCalibration, loaded: LoadedModel, path: str | Path, extra: dict | None = None, fingerprint: str = ""
) -> dict:
    """Write ``exact`` to ``path`` (a temporary path: callers commit it atomically); returns the header."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    sites = {}
    for key in sorted(exact.moments):
        m = exact.moments[key]
        tensors[_name(key, "gram")] = m.gram
        tensors[_name(key, "total")] = m.total
        tensors[_name(key, "odd_gram")] = m.odd_gram
        tensors[_name(key, "odd_total")] = m.odd_total
        tensors[_name(key, "exponents")] = m.scale.exponents
        tensors[_name(key, "pinned")] = m.pinned
        counts = {"count": m.count, "odd_count": m.odd_count, "count_exponent": m.scale.count_exponent}
        sites[f"{key[0]}.{key[1]}"] = counts
    start, stop, total = exact.batches
    header = {
        "format": FORMAT,
        "model_id": exact.model_id,
        "model_fingerprint": fingerprint or model_fingerprint(loaded),
        "model_type": loaded.model.config.model_type,
        "sites": sorted({k[0] for k in exact.moments}),
        "layers": sorted({k[1] for k in exact.moments}),
        "site_counts": sites,
        "tokens": exact.tokens,
        "domains": exact.domains,
        "fixed_prefix": exact.fixed_prefix,
        "corpus_hash": exact.corpus,
        "batches": {"start": start, "stop": stop, "total": total},
        "model_dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(loaded.device),
        **(extra or {}),
    }
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), {HEADER: json.dumps(header)})
    return header


def read_header(path: str | Path) -> dict:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraCompileError(f"moments file {path} does not exist: make one with `lora-compile calibrate -o FILE`")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise LoraCompileError(f"{path} is not a safetensors moments file ({exc})") from None
    if HEADER not in meta:
        raise LoraCompileError(f"{path} is not a moments file (no {HEADER} header): make one with `calibrate -o`")
    header = json.loads(meta[HEADER])
    if header.get("format") != FORMAT:
        raise LoraCompileError(f"{path}: moments format {header.get('format')!r}, this version reads {FORMAT!r}")
    return header


def load_moments(
    paths: list[str | Path], loaded: LoadedModel, keys: list[SiteKey] | None = None
) -> tuple[ExactCalibration, list[dict]]:
    """The moments of one calibration from ``paths`` at ``keys`` (default: every site the files hold).

    The files are shards (the same sites, batch ranges that tile the calibration; summed) and/or
    layer groups (disjoint sites, each group's shards tiling it). Refused in one line: a file of
    another model or another calibration text, files sharing some sites but not all, overlapping
    or missing shards, a needed site that the files lack.
    """
    from safetensors import safe_open

    if not paths:
        raise LoraCompileError("no moments files given")
    headers = [read_header(p) for p in paths]
    fingerprint = model_fingerprint(loaded)
    for p, h in zip(paths, headers):
        if h["model_fingerprint"] != fingerprint:
            raise LoraCompileError(
                f"{p} holds moments of another model ({h['model_id']}, fingerprint {h['model_fingerprint']}), "
                f"not of {loaded.name} ({fingerprint}): calibrate this model with `lora-compile calibrate`"
            )
    first = headers[0]
    for p, h in zip(paths[1:], headers[1:]):
        if h["corpus_hash"] != first["corpus_hash"]:
            raise LoraCompileError(
                f"{p} is from another calibration text than {paths[0]}: combine only shards of one calibration"
            )
    # Files with the same sites are shards of one group; groups must not share a site.
    groups: dict[frozenset, list[int]] = {}
    for i, h in enumerate(headers):
        groups.setdefault(frozenset(h["site_counts"]), []).append(i)
    seen: dict[str, int] = {}
    for sites, members in groups.items():
        for site in sites:
            if site in seen:
                raise LoraCompileError(
                    f"{paths[members[0]]} and {paths[seen[site]]} share some sites but not all: give shards "
                    "of the same sites, or layer groups of disjoint sites"
                )
            seen[site] = members[0]
        _check_shards([paths[i] for i in members], [headers[i] for i in members])
    held = sorted((s.rsplit(".", 1)[0], int(s.rsplit(".", 1)[1])) for s in seen)
    keys = held if keys is None else sorted(set(keys))
    missing = [k for k in keys if k not in held]
    if missing:
        have = ", ".join(f"{s} {layer}" for s, layer in held)
        need = ", ".join(f"{s} {layer}" for s, layer in missing)
        named = str(paths[0]) if len(paths) == 1 else "the moments files"
        raise LoraCompileError(
            f"{named} has no moments for {need} (it holds {have}): calibrate with --site/--layers covering them"
        )
    total: dict[SiteKey, ExactMoments] = {}
    for p, h in zip(paths, headers):
        with safe_open(str(p), "pt", device=str(loaded.device)) as f:
            for key in keys:
                if f"{key[0]}.{key[1]}" not in h["site_counts"]:
                    continue  # in another layer group's file
                counts = h["site_counts"][f"{key[0]}.{key[1]}"]
                site = site_device(loaded, key)  # as calibrate keeps them

                def get(part: str, key: SiteKey = key, site: torch.device = site) -> torch.Tensor:
                    return f.get_tensor(_name(key, part)).to(site)

                scale = FixedPointScale(get("exponents").cpu(), counts["count_exponent"])
                m = ExactMoments(
                    scale, get("gram"), get("total"), counts["count"], get("odd_gram"), get("odd_total"),
                    counts["odd_count"], get("pinned"),
                )  # fmt: skip
                total[key] = m if key not in total else total[key] + m
    # Tokens and domains of the calibration: the same in every group, so from one group's shards.
    one_group = [headers[i] for i in next(iter(groups.values()))]
    domains: dict[str, int] = {}
    for h in one_group:
        for d, n in h["domains"].items():
            domains[d] = domains.get(d, 0) + n
    exact = ExactCalibration(
        model_id=loaded.model_id,
        moments=total,
        tokens=sum(h["tokens"] for h in one_group),
        domains=domains,
        fixed_prefix=first["fixed_prefix"],
        corpus=first["corpus_hash"],
        batches=(0, first["batches"]["total"], first["batches"]["total"]),
    )
    return exact, headers


def _check_shards(paths: list[str | Path], headers: list[dict]) -> None:
    """The files' batch ranges must tile the calibration's batches exactly once."""
    spans = sorted((h["batches"]["start"], h["batches"]["stop"], str(p)) for p, h in zip(paths, headers))
    total = headers[0]["batches"]["total"]
    at = 0
    for start, stop, p in spans:
        if start < at:
            raise LoraCompileError(f"{p} overlaps another moments file (batches {start}–{stop}): give each shard once")
        if start > at:
            raise LoraCompileError(
                f"moments files miss batches {at}–{start} of {total} of their calibration: give every shard"
            )
        at = stop
    if at != total:
        raise LoraCompileError(
            f"moments files miss batches {at}–{total} of {total} of their calibration: give every shard"
        )
