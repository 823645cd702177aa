"""Foreign steering-vector formats in and out (DESIGN §4).

Every import normalises into our own ``SteeringVector`` (``direction.N`` at a site,
with metadata ``site``, ``model``, ``method``, ``source``), mapping each tool's
layer convention exactly:

- llama.cpp / repeng control vector (GGUF): ``direction.N`` is added to the output
  of block N = ``resid_post N``.
- IBM activation-steering ``.svec`` (JSON): the vector for layer k is added to the
  *input* of block k = ``resid_post k−1``; k = 0 is the embedding output, ``resid_pre 0``.
- steering-vectors (pip) ``dict[layer, Tensor]`` with ``layer_type="decoder_block"``
  (the block's output) = ``resid_post``.
- a bare tensor (``.safetensors`` / ``.pt`` / ``.npy``): the file does not say where
  it goes, so the caller names the layer (and site); a ``[layers, d]`` matrix is row L
  = layer L.
- a row of an SAE decoder, ``FILE:KEY[INDEX]``: the feature's decoder direction.

Export writes a llama.cpp control-vector GGUF; our own file format is in vectors.py.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from .architectures import check_site_name
from .errors import LoraCompileError
from .outputs import atomic_file
from .vectors import SteeringVector, load_vector

FORMATS = ("auto", "gguf", "svec", "safetensors", "pt", "npy", "sae")
_SUFFIX_FORMATS = {
    ".gguf": "gguf",
    ".svec": "svec",
    ".json": "svec",
    ".safetensors": "safetensors",
    ".pt": "pt",
    ".pth": "pt",
    ".bin": "pt",
    ".npy": "npy",
}
_DIRECTION = re.compile(r"^direction\.(\d+)$")
# FILE:KEY or FILE:KEY[INDEX]; KEY may contain dots (``decoder.weight``) but no ':' or brackets.
_SELECTOR = re.compile(r"^(?P<file>.+):(?P<key>[^:\[\]]+)(?:\[(?P<index>[^\]]*)\])?$")
CONTROL_VECTOR_ARCH = "controlvector"
# steering-vectors' layer_type whose meaning is architecture-independent: the block's output.
_STEERING_VECTORS_LAYER_TYPES = {"decoder_block": "resid_post"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _as_float_vector(data, what: str) -> torch.Tensor:
    """A float32 tensor from a numpy array or tensor; refuse integer/bool data."""
    tensor = torch.from_numpy(np.array(data)) if isinstance(data, np.ndarray) else data
    if not isinstance(tensor, torch.Tensor):
        raise LoraCompileError(f"{what} is a {type(tensor).__name__}, not a tensor: store steering vectors as tensors")
    if not tensor.is_floating_point():
        raise LoraCompileError(f"{what} has dtype {tensor.dtype}; steering vectors must be floating point")
    return tensor.detach().to(torch.float32).contiguous()


def _refuse_placement(fmt: str, layer: int | None, site: str | None, why: str) -> None:
    """Formats that fix their own layers and site do not take --layer/--site."""
    given = [name for name, value in (("--layer", layer), ("--site", site)) if value is not None]
    if given:
        raise LoraCompileError(f"{' and '.join(given)}: not for {fmt} files ({why}); pick layers with --layers")


def split_source(source: str | Path) -> tuple[Path, str | None, str | None]:
    """``FILE``, ``FILE:KEY`` or ``FILE:KEY[INDEX]`` → (file, key, index text)."""
    text = str(source)
    if Path(text).is_file():
        return Path(text), None, None
    m = _SELECTOR.match(text)
    if m is not None and Path(m["file"]).is_file():
        return Path(m["file"]), m["key"], m["index"]
    path = Path(m["file"] if m is not None else text)
    raise LoraCompileError(f"vector source {path} does not exist: pass an existing file (or FILE:KEY[INDEX])")


def detect_format(path: Path, key: str | None, index: str | None) -> str:
    if index is not None:
        return "sae"
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise LoraCompileError(
            f"cannot tell the format of {path.name} from its name: pass --format ({', '.join(FORMATS[1:])})"
        )
    return fmt


# ---- llama.cpp / repeng control vectors -------------------------------------------------


def _gguf_string(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    value = field.contents()
    return value if isinstance(value, str) else None


def read_gguf(path: Path) -> SteeringVector:
    """A llama.cpp / repeng control vector: ``direction.N`` = ``resid_post N``."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError, TypeError) as exc:
        raise LoraCompileError(f"{path} is not a readable GGUF file ({_first_line(exc)})") from exc
    arch = _gguf_string(reader, "general.architecture")
    if arch != CONTROL_VECTOR_ARCH:
        raise LoraCompileError(
            f"{path} is a GGUF file with general.architecture={arch!r}, not a control vector "
            f"({CONTROL_VECTOR_ARCH!r}): pass a llama.cpp / repeng control-vector file"
        )
    count = reader.get_field(f"{CONTROL_VECTOR_ARCH}.layer_count")
    if count is not None and count.types not in ([GGUFValueType.INT32], [GGUFValueType.UINT32]):
        names = "/".join(t.name for t in count.types)
        raise LoraCompileError(f"{path}: {CONTROL_VECTOR_ARCH}.layer_count has type {names}; expected int32 or uint32")
    directions: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        m = _DIRECTION.match(tensor.name)
        if m is None:
            continue
        if tensor.tensor_type != GGMLQuantizationType.F32:
            raise LoraCompileError(
                f"{path}: {tensor.name} has type {tensor.tensor_type.name}; llama.cpp control vectors are F32"
            )
        if sum(int(n) > 1 for n in tensor.shape) > 1:
            raise LoraCompileError(f"{path}: {tensor.name} has shape {list(tensor.shape)}; expected one vector")
        directions[int(m.group(1))] = torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(-1))
    if not directions:
        raise LoraCompileError(f"{path} holds no direction.N tensors: it is not a usable control vector")
    meta = {"method": "llama.cpp/repeng control vector", "convention": "direction.N = output of block N"}
    hint = _gguf_string(reader, f"{CONTROL_VECTOR_ARCH}.model_hint")
    if hint:
        meta["model_hint"] = hint
    return SteeringVector(directions, "resid_post", meta)


def write_gguf(vector: SteeringVector, path: str | Path, model_hint: str, force: bool = False) -> Path:
    """Write ``vector`` as a llama.cpp control vector (readable by repeng's ``import_gguf``)."""
    from gguf import GGUFWriter

    if vector.site != "resid_post":
        raise LoraCompileError(
            f"a llama.cpp control vector adds to block outputs (resid_post); this vector is at {vector.site}, "
            "which it cannot express: export a resid_post vector"
        )
    if not vector.directions:
        raise LoraCompileError("the vector holds no directions to export")
    if 0 in vector.directions:
        raise LoraCompileError(
            "llama.cpp refuses direction.0 (it applies control vectors from block 1 on): "
            "leave layer 0 out with --layers"
        )
    with atomic_file(path, force) as tmp:
        writer = GGUFWriter(str(tmp), CONTROL_VECTOR_ARCH)
        writer.add_string(f"{CONTROL_VECTOR_ARCH}.model_hint", model_hint)
        # llama.cpp's own generator writes int32 (repeng uint32); both readers take either.
        writer.add_int32(f"{CONTROL_VECTOR_ARCH}.layer_count", len(vector.directions))
        for layer in vector.layers:
            writer.add_tensor(f"direction.{layer}", vector.directions[layer].detach().float().numpy().copy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(path)


# ---- IBM activation-steering .svec ------------------------------------------------------


def read_svec(path: Path, layers: list[int] | None) -> SteeringVector:
    """IBM activation-steering: layer k's vector is added to the input of block k.

    That is ``resid_post k−1``; layer 0 is the embedding output, ``resid_pre 0``,
    which cannot share a vector with the others (different site).
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraCompileError(f"{path} is not a readable .svec JSON file ({_first_line(exc)})") from exc
    raw = data.get("directions") if isinstance(data, dict) else None
    if not isinstance(raw, dict) or not raw:
        raise LoraCompileError(f"{path} has no 'directions' object: it is not an activation-steering .svec file")
    try:
        by_layer = {int(k): v for k, v in raw.items()}
    except ValueError as exc:
        raise LoraCompileError(f"{path}: 'directions' keys must be layer numbers ({_first_line(exc)})") from exc
    if layers:
        missing = [k for k in layers if k not in by_layer]
        if missing:
            raise LoraCompileError(f"{path} has no direction for layer(s) {missing}; it has {sorted(by_layer)}")
        by_layer = {k: by_layer[k] for k in layers}
    if 0 in by_layer and len(by_layer) > 1:
        raise LoraCompileError(
            f"{path} holds layer 0 (the embedding output, resid_pre 0) together with layers "
            f"{sorted(k for k in by_layer if k)} (resid_post k−1): one vector has one site, "
            "so choose layers with --layers (e.g. --layers 0, or the others)"
        )
    directions = {}
    for k, values in by_layer.items():
        if not isinstance(values, list) or not all(isinstance(x, (int, float)) for x in values):
            raise LoraCompileError(f"{path}: direction for layer {k} is not a list of numbers")
        directions[k] = torch.tensor(values, dtype=torch.float64).to(torch.float32)
    meta = {"method": "activation-steering .svec", "convention": "layer k = input of block k"}
    if isinstance(data.get("model_type"), str):
        meta["model_hint"] = data["model_type"]
    if any(k < 0 for k in directions):
        raise LoraCompileError(f"{path}: negative layer numbers are not supported; renumber them from 0")
    if list(directions) == [0]:
        return SteeringVector(directions, "resid_pre", meta)
    return SteeringVector({k - 1: v for k, v in directions.items()}, "resid_post", meta)


# ---- tensor files: safetensors, .pt, .npy -----------------------------------------------


def _load_tensor_file(path: Path, fmt: str):
    """The file's content: dict[str, Tensor] (safetensors), a tensor or dict (.pt), an array (.npy)."""
    try:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if fmt == "pt":
            return torch.load(str(path), map_location="cpu", weights_only=True)
        return np.load(str(path), allow_pickle=False)
    except pickle.UnpicklingError as exc:
        raise LoraCompileError(
            f"{path} holds Python objects, not plain tensors ({_first_line(exc)}): save a tensor or a "
            "dict of tensors (for steering-vectors, torch.save(vector.layer_activations, ...))"
        ) from exc
    except Exception as exc:  # each loader raises its own types for a corrupt file
        raise LoraCompileError(f"{path} is not a readable {fmt} file ({_first_line(exc)})") from exc


def _layer_key(key) -> int | None:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str):
        m = _DIRECTION.match(key)
        if m is not None:
            return int(m.group(1))
        if key.isdigit():
            return int(key)
    return None


def _select_key(content, key: str, path: Path):
    if not isinstance(content, dict):
        raise LoraCompileError(f"{path} holds a single tensor, not named tensors: drop ':{key}' from the source")
    if key not in content:
        names = ", ".join(sorted(map(str, content)))
        raise LoraCompileError(f"{path} has no tensor {key!r}; it has: {names}")
    return content[key]


def decoder_row(matrix: torch.Tensor, index_text: str, hidden_size: int | None, what: str) -> tuple[torch.Tensor, str]:
    """Row INDEX of an SAE decoder and how its orientation was decided.

    SAELens stores ``W_dec`` as ``[features, d]``; a ``torch.nn.Linear`` decoder
    weight is ``[d, features]``. With the model's hidden size d the axis of length d
    decides (a square matrix is taken as SAELens rows); without it, the longer axis
    is taken as features, since SAEs are overcomplete.
    """
    try:
        index = int(index_text)
    except ValueError:
        raise LoraCompileError(f"bad index [{index_text}] in {what}: use a feature number, e.g. W_dec[1234]") from None
    if matrix.ndim != 2:
        raise LoraCompileError(f"{what} has shape {list(matrix.shape)}; an SAE decoder is a 2-D matrix")
    rows, cols = matrix.shape
    if hidden_size is not None:
        if hidden_size not in (rows, cols):
            raise LoraCompileError(
                f"{what} has shape {[rows, cols]}, which fits neither [features, {hidden_size}] nor "
                f"[{hidden_size}, features] for the model's hidden size {hidden_size}: use this model's SAE"
            )
        by_rows = cols == hidden_size
        why = f"by the model's hidden size {hidden_size}"
    else:
        by_rows = rows >= cols
        why = "taking the longer axis as features (no --model)"
    how = f"{'[features, d]' if by_rows else '[d, features]'} {why}"
    features = rows if by_rows else cols
    if not 0 <= index < features:
        raise LoraCompileError(f"index {index} is out of range in {what}: it has features 0..{features - 1}")
    return (matrix[index] if by_rows else matrix[:, index]), how


def read_tensor_file(
    path: Path,
    fmt: str,
    key: str | None,
    index: str | None,
    layer: int | None,
    site: str | None,
    hidden_size: int | None,
) -> SteeringVector:
    if fmt == "safetensors" and key is None and index is None:
        with_directions = _try_own_file(path, layer, site)
        if with_directions is not None:
            return with_directions
    content = _load_tensor_file(path, fmt)
    what = f"{path.name}:{key}" if key is not None else path.name
    meta = {"method": f"{fmt} tensor"}
    if key is not None:
        content = _select_key(content, key, path)
    if isinstance(content, dict) and "layer_activations" in content:  # steering-vectors' SteeringVector fields
        layer_type = content.get("layer_type", "decoder_block")
        if layer_type not in _STEERING_VECTORS_LAYER_TYPES:
            raise LoraCompileError(
                f"{what}: steering-vectors layer_type {layer_type!r} is not supported; only decoder_block "
                "(the block output, resid_post) means the same thing in every architecture"
            )
        site = site or _STEERING_VECTORS_LAYER_TYPES[layer_type]
        content = content["layer_activations"]
        meta = {"method": "steering-vectors", "convention": "decoder_block layer L = output of block L"}
    if isinstance(content, dict) and len(content) == 1 and _layer_key(next(iter(content))) is None:
        content = next(iter(content.values()))
    if isinstance(content, dict):
        layers = {k: _layer_key(k) for k in content}
        if not content or None in layers.values():
            names = ", ".join(sorted(map(str, content))) or "nothing"
            raise LoraCompileError(
                f"{path} holds tensors named {names}: name layers by number (dict[layer, tensor]) "
                "or pick one tensor with FILE:KEY"
            )
        _refuse_placement("layer-keyed", layer, None, "the keys give the layers")
        meta.setdefault("convention", "key L = layer L")
        directions = {layers[k]: _as_float_vector(v, f"{what} layer {k}") for k, v in content.items()}
        return SteeringVector(directions, site or "resid_post", meta)
    tensor = _as_float_vector(content, what)
    if index is not None:
        tensor, how = decoder_row(tensor, index, hidden_size, what)
        meta = {"method": "sae decoder row", "feature": index, "orientation": how}
    if tensor.ndim == 2:
        _refuse_placement("[layers, d] matrix", layer, None, "row L is layer L")
        meta["convention"] = "row L = layer L"
        return SteeringVector({i: row.clone() for i, row in enumerate(tensor)}, site or "resid_post", meta)
    if tensor.ndim != 1:
        raise LoraCompileError(f"{what} has shape {list(tensor.shape)}: expected a vector or a [layers, d] matrix")
    if layer is None:
        raise LoraCompileError(f"{what} is a single vector and does not say where it goes: pass --layer (and --site)")
    meta["convention"] = "given by the user"
    return SteeringVector({layer: tensor.clone()}, site or "resid_post", meta)


def _try_own_file(path: Path, layer: int | None, site: str | None) -> SteeringVector | None:
    """Our own format (direction.N + site metadata), or None if the file is something else."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            ours = any(_DIRECTION.match(k) for k in f.keys())
    except Exception as exc:
        raise LoraCompileError(f"{path} is not a readable safetensors file ({_first_line(exc)})") from exc
    if not ours:
        return None
    vector = load_vector(path)
    _refuse_placement("lora_compile vector", layer, None, "direction.N gives the layers")
    if site is not None and site != vector.site:
        raise LoraCompileError(f"{path} says its site is {vector.site}, not {site}: drop --site")
    vector.metadata.setdefault("convention", "direction.N = layer N at its site")
    return vector


# ---- the entry point --------------------------------------------------------------------


def read_vector(
    source: str | Path,
    format: str = "auto",
    *,
    layer: int | None = None,
    site: str | None = None,
    layers: list[int] | None = None,
    hidden_size: int | None = None,
) -> SteeringVector:
    """Read a steering vector in any supported format, in our convention.

    ``layers`` selects layers in the source file's own numbering. ``hidden_size``
    (the target model's) decides an SAE decoder's orientation.
    """
    if format not in FORMATS:
        raise LoraCompileError(f"unknown format {format!r}: use one of {', '.join(FORMATS)}")
    if site is not None:
        check_site_name(site)
    path, key, index = split_source(source)
    fmt = detect_format(path, key, index) if format == "auto" else format
    if fmt == "sae":
        if index is None:
            raise LoraCompileError(
                f"an SAE decoder row is named FILE:KEY[INDEX], e.g. sae.safetensors:W_dec[12]; got {source}"
            )
        fmt = detect_format(path, None, None)
        if fmt not in ("safetensors", "pt"):
            raise LoraCompileError(f"{path.name}: SAE decoders are read from .safetensors or .pt files")
    if fmt in ("gguf", "svec") and (key is not None or index is not None):
        raise LoraCompileError(f"{fmt} files take no :KEY[INDEX] selector; pass the file alone")
    if fmt == "gguf":
        _refuse_placement("gguf", layer, site, "direction.N is added to the output of block N (resid_post N)")
        vector = read_gguf(path).select(layers)
    elif fmt == "svec":
        _refuse_placement("svec", layer, site, "layer k is added to the input of block k (resid_post k−1)")
        vector = read_svec(path, layers)
    else:
        vector = read_tensor_file(path, fmt, key, index, layer, site, hidden_size).select(layers)
    for k, vec in vector.directions.items():
        if vec.ndim != 1 or vec.numel() != vector.directions[vector.layers[0]].numel():
            raise LoraCompileError(f"{path.name}: the directions differ in length (layer {k}): one model, one size")
    vector.check_values(path.name)
    source_name = path.name + (f":{key}" if key else "") + (f"[{index}]" if index is not None else "")
    meta = {**vector.metadata, "source": source_name, "source_format": fmt}
    meta.setdefault("model", meta.get("model_hint", "unknown"))
    return SteeringVector(vector.directions, vector.site, {k: str(v) for k, v in meta.items()})
