"""The Python API: the passes put together. The CLI is a thin layer over these."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import corpus, distributed, formats
from .architectures import check_site_name
from .calibrate import (
    Calibration,
    calibrate,
    calibrate_exact,
    calibrate_sequential,
    compiled_deltas,
    encode,
    exact_projections,
    post_norm_gain,
    project_inputs,
    self_generate,
    writer_outputs,
)
from .devices import DEFAULT_DEVICE, DEFAULT_MODEL_DTYPE, PeakMemory, peak_memory
from .emit import (
    REPORT,
    Factors,
    SiteWeights,
    adapter_config,
    adapter_tensors,
    balanced,
    write_adapter_files,
    writer_factors,
)
from .errors import LoraCompileError
from .extract import ContrastPair, check_options, extract, read_contrast_texts, read_pairs
from .fit import (
    check_direction_method,
    choose_ridge,
    fit_direction,
    fit_errors,
    fit_post_norm_vector,
    predicted_kl_ratio,
)
from .merge import adapter_deltas, merged_model, save_merged, write_merged
from .models import DEFAULT_MODEL_ID, LoadedModel, load_config, load_model
from .momentsfile import group_paths, load_moments, model_fingerprint, read_header, save_moments
from .outputs import atomic_outputs, check_writable
from .refine import RefineOptions, heldout_kl, split_samples, train_lora
from .routes import (
    ValueRouteFit,
    check_route,
    fit_value_route,
    next_layer_site,
    next_layer_steering,
    value_route_modules,
)
from .scan import (
    add_value_routes,
    memory_plan,
    plan_layer_groups,
    plot_scan,
    scan_in_groups,
    scan_result,
    scan_sites,
    site_keys,
    site_rows,
)
from .sweep import DEFAULT_COEFS, SweepResult, check_coefs, plot_sweep, sweep_coefficients
from .targets import DEFAULT_TARGET, PROFILES, TargetProfile, lint, meta_model, profile, read_adapter, torch_dtype
from .vectors import SteeringVector, load_vector, save_vector
from .verify import VerifyReport, verify

ModelArg = LoadedModel | str | None
# Text files (.txt/.jsonl) or samples; None means the shipped corpus.
TextsArg = list[str | Path | corpus.Sample] | None
VectorArg = SteeringVector | str | Path
MomentsArg = list[str | Path] | None  # moments files (shards of one calibration)


def _model(model: ModelArg, device: str = DEFAULT_DEVICE, model_dtype: str = DEFAULT_MODEL_DTYPE) -> LoadedModel:
    """A loaded model is used as it is (its own device and dtype); a name is loaded on ``device`` in ``model_dtype``."""
    if isinstance(model, LoadedModel):
        return model
    return load_model(model, model_dtype, device)


def _vector(vector: VectorArg) -> SteeringVector:
    return vector if isinstance(vector, SteeringVector) else load_vector(vector)


def _select(vector: VectorArg, layers: list[int] | None, site: str | None) -> SteeringVector:
    """The vector's chosen layers, at ``site`` if given (else the vector's own site)."""
    steering = _vector(vector).select(layers)
    if site is None:
        return steering
    return SteeringVector(steering.directions, check_site_name(site), dict(steering.metadata))


def calibration_samples(
    loaded: LoadedModel,
    texts: TextsArg = None,
    self_generated: int = 0,
    seed: int = 0,
) -> list[corpus.Sample]:
    """Calibration text: the shipped corpus (or user files) plus the model's own chats."""
    samples = corpus.load_texts(texts, corpus.default_calibration())
    return samples + self_generate(loaded, corpus.chat_prompts(samples), self_generated, seed=seed)


def parse_shard(spec: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'i/N' (0 ≤ i < N) → (i, N)."""
    if spec is None or isinstance(spec, tuple):
        return spec
    i, _, n = spec.partition("/")
    if not (i.isdigit() and n.isdigit()) or not 0 <= int(i) < int(n):
        raise LoraCompileError(f"cannot read shard {spec!r}: use i/N with 0 ≤ i < N, e.g. 0/2")
    return int(i), int(n)


def calibrate_moments(
    out: str | Path,
    model: ModelArg = None,
    *,
    sites: list[str] | None = None,
    layers: list[int] | None = None,
    texts: TextsArg = None,
    self_generated: int = 0,
    seed: int = 0,
    shard: str | tuple[int, int] | None = None,
    force: bool = False,
    device: str = DEFAULT_DEVICE,
    model_dtype: str = DEFAULT_MODEL_DTYPE,
    group_layers: int | None = None,
) -> dict:
    """Calibrate once and write the moments to ``out`` (safetensors) for ``compile/scan --moments``.

    All fitted sites and layers by default. ``shard`` ``i/N``: only the i-th of N shares of the
    calibration batches; the N files together give the bits of one run. Under torchrun the ranks
    split the batches and rank 0 writes. Layers are calibrated in groups whose moments fit the
    device (``group_layers``, or planned as ``scan`` plans them); with several groups each is written
    to its own file as soon as it is done (``momentsfile.group_paths``: ``out``'s name with the
    group's layers), so no more than one group's sums are ever held; ``--moments`` takes them all.
    The files are committed together at the end. Returns the first file's header, with ``files``.
    """
    check_writable(out, force)
    part = parse_shard(shard)
    if group_layers is not None and group_layers < 1:
        raise LoraCompileError(f"--group-layers {group_layers}: give a positive number of layers per group")
    loaded = _model(model, device, model_dtype)
    keys = site_keys(loaded, sites, layers)
    samples = calibration_samples(loaded, texts, self_generated, seed)
    groups = plan_layer_groups(loaded, keys, group_layers)
    paths = group_paths(out, groups)
    fingerprint = model_fingerprint(loaded)
    headers: list[dict] = []
    main = distributed.is_main()
    with peak_memory(loaded.devices) as peak, atomic_outputs(paths if main else [], force) as temps:
        for i, group in enumerate(groups):
            exact = calibrate_exact(loaded, samples, [k for k in keys if k[1] in group], shard=part)
            if main:
                exact.moments = {k: m.to("cpu") for k, m in exact.moments.items()}
                extra = {"shard": list(part) if part else None, "self_generated": self_generated}
                extra["memory"] = peak.read().to_dict()  # the peak so far
                headers.append(save_moments(exact, loaded, temps[i], extra, fingerprint))
            del exact  # this group's sums, before the next group's are allocated
    return {**headers[0], "files": [str(p) for p in paths]} if headers else {}


def _file_calibration(moments: MomentsArg, loaded: LoadedModel, keys: list | None) -> tuple[Calibration, dict]:
    """The float64 calibration of moments files at ``keys`` and a summary of the files for reports."""
    exact, headers = load_moments(list(moments), loaded, keys)
    summary = {
        "moments_files": [str(p) for p in moments],
        "corpus_hash": exact.corpus,
        "moments_model_dtype": sorted({h["model_dtype"] for h in headers}),
    }
    return exact.to_calibration(), summary


def _json_text(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_json(path: str | Path, data: dict, force: bool) -> None:
    write_outputs({path: lambda tmp: tmp.write_text(_json_text(data))}, force)


def write_outputs(writers: dict[str | Path | None, Callable[[Path], object]], force: bool) -> None:
    """Write several outputs (path → writer of a temporary path) all together or not at all; None paths skip."""
    chosen = {Path(p): w for p, w in writers.items() if p is not None}
    with atomic_outputs(list(chosen), force) as temps:
        for tmp, write in zip(temps, chosen.values()):
            write(tmp)


def scan(
    model: ModelArg = None,
    *,
    sites: list[str] | None = None,
    layers: list[int] | None = None,
    texts: TextsArg = None,
    heldout: TextsArg = None,
    self_generated: int = 0,
    ridge: float | None = None,
    seed: int = 0,
    out_json: str | Path | None = None,
    out_png: str | Path | None = None,
    force: bool = False,
    calibration: Calibration | None = None,
    device: str = DEFAULT_DEVICE,
    model_dtype: str = DEFAULT_MODEL_DTYPE,
    group_layers: int | None = None,
    moments: MomentsArg = None,
    vector: VectorArg = None,
    coef: float = 1.0,
) -> tuple[dict, Calibration | None]:
    """Fit error of ridge and axis directions at every site; returns (result, calibration).

    ``moments``: moments files (``calibrate_moments``) instead of calibrating; without ``sites``
    and ``layers`` every site the files hold is scanned.

    The calibration (on the CPU) can be passed on to ``compile_adapter`` to skip recomputing it.
    Layers are calibrated in groups whose moments fit in memory (``group_layers`` per group, or
    planned from the free memory of the model's device, see ``scan.plan_layer_groups``); a scan in
    several groups keeps no moments and returns None for the calibration. ``result["memory"]``
    has the plan and the peak memory.

    ``vector``: also fit the value route (``routes``) for ``coef·vector`` at every ``resid_mid``
    layer the vector has, and report its held-out error beside the writer's (``value_route`` in
    those rows). Give the coefficient you will compile with: the writer's share is fitted on its
    input shifted by the value LoRA, a shift proportional to it.
    """
    for path in (out_json, out_png):
        if path is not None:
            check_writable(path, force)
    if group_layers is not None and group_layers < 1:
        raise LoraCompileError(f"--group-layers {group_layers}: give a positive number of layers per group")
    loaded = _model(model, device, model_dtype)
    steering = _vector(vector) if vector is not None else None
    if steering is not None:
        steering.validate(loaded)
    if moments and sites is None and layers is None:
        held = {k for path in moments for k in read_header(path)["site_counts"]}  # layer groups: several files
        keys = sorted((k.rsplit(".", 1)[0], int(k.rsplit(".", 1)[1])) for k in held)
    else:
        keys = site_keys(loaded, sites, layers)
    heldout_samples = corpus.load_texts(heldout, corpus.default_heldout())
    with peak_memory(loaded.devices) as peak:
        if calibration is not None:
            result = scan_sites(loaded, calibration, heldout_samples, ridge)
            groups = [sorted({layer for _, layer in calibration.moments})]
        elif moments:
            groups = plan_layer_groups(loaded, keys, group_layers)
            rows, summary = [], {}
            for group in groups:  # one group's moments in memory at a time, as when calibrating
                calibration, summary = _file_calibration(moments, loaded, [k for k in keys if k[1] in group])
                rows += site_rows(loaded, calibration, heldout_samples, ridge)
            result = scan_result(loaded, rows, calibration, heldout_samples, ridge)
            result["calibration"].update(summary)
            calibration = calibration.to("cpu") if len(groups) == 1 else None
        else:
            samples = calibration_samples(loaded, texts, self_generated, seed)
            groups = plan_layer_groups(loaded, keys, group_layers)
            result, calibration = scan_in_groups(loaded, samples, heldout_samples, keys, groups, ridge)
        if steering is not None and distributed.is_main():
            samples = calibration_samples(loaded, texts, self_generated, seed)
            directions = {layer: coef * d for layer, d in steering.directions.items()}
            add_value_routes(loaded, result, directions, samples, heldout_samples, ridge)
    result["memory"] = {**peak.to_dict(), **memory_plan(loaded, keys, groups)}
    if distributed.is_main():  # under torchrun the other ranks only helped calibrate
        write_outputs(
            {out_json: lambda tmp: tmp.write_text(_json_text(result)), out_png: lambda tmp: plot_scan(result, tmp)},
            force,
        )
    return result, calibration


def _pairs(
    pairs: str | Path | list[ContrastPair] | None, positive: str | Path | None, negative: str | Path | None
) -> list[ContrastPair] | None:
    if (positive is None) != (negative is None):
        raise LoraCompileError("give both --positive and --negative text files, or a --pairs file")
    if positive is not None:
        if pairs is not None:
            raise LoraCompileError("give either a pairs file or --positive/--negative text files, not both")
        return read_contrast_texts(positive, negative)
    if pairs is None or isinstance(pairs, list):
        return pairs
    return read_pairs(pairs)


def extract_vector(
    pairs: str | Path | list[ContrastPair] | None,
    layers: list[int],
    model: ModelArg = None,
    out: str | Path | None = None,
    force: bool = False,
    *,
    method: str = "mean_diff",
    position: str = "last",
    positive: str | Path | None = None,
    negative: str | Path | None = None,
    device: str = DEFAULT_DEVICE,
    model_dtype: str = DEFAULT_MODEL_DTYPE,
) -> SteeringVector:
    """A steering vector at ``resid_post L`` from contrast pairs, for every layer in one pass.

    ``pairs``: a ``.jsonl`` of ``{positive, negative[, prompt]}`` or a list of pairs;
    or ``positive``/``negative`` text files paired text by text. ``method``:
    mean_diff, pca_diff, pca_center; ``position``: last, mean, answer. Per-layer
    separability is in ``vector.separability`` (and the file's metadata).
    """
    if out is not None:
        check_writable(out, force)
    pair_list = _pairs(pairs, positive, negative)
    if pair_list is None:
        raise LoraCompileError("no contrast pairs given: pass a pairs .jsonl or --positive/--negative text files")
    check_options(method, position)
    vector = extract(_model(model, device, model_dtype), pair_list, layers, method, position)
    if out is not None:
        save_vector(vector, out, force)
    return vector


def import_vector(
    source: str | Path,
    out: str | Path | None = None,
    *,
    format: str = "auto",
    layer: int | None = None,
    site: str | None = None,
    layers: list[int] | None = None,
    model: ModelArg = None,
    force: bool = False,
) -> SteeringVector:
    """Read a foreign steering vector (GGUF control vector, .svec, tensor file, SAE row) in our convention.

    ``source`` is a file or ``FILE:KEY[INDEX]``; ``layer``/``site`` place a vector whose
    file does not say where it goes; ``layers`` picks layers in the file's own numbering.
    ``model``, when given, is checked against (hidden size, layers); None checks nothing.
    """
    if out is not None:
        check_writable(out, force)
    loaded = None if model is None else _model(model)
    vector = formats.read_vector(
        source, format, layer=layer, site=site, layers=layers, hidden_size=loaded.hidden_size if loaded else None
    )
    if loaded is not None:
        vector.validate(loaded)
        vector.metadata["model"] = loaded.model_id
    if out is not None:
        save_vector(vector, out, force)
    return vector


def export_gguf(
    vector: VectorArg,
    out: str | Path,
    *,
    layers: list[int] | None = None,
    model: ModelArg = None,
    force: bool = False,
) -> Path:
    """Write a resid_post vector as a llama.cpp control vector (``direction.N`` F32).

    ``model``, when given, is checked against and names the file's model hint.
    """
    check_writable(out, force)
    steering = _vector(vector).select(layers)
    hint = steering.metadata.get("model_hint") or steering.metadata.get("model") or "unknown"
    if model is not None:
        loaded = _model(model)
        steering.validate(loaded)
        hint = loaded.model.config.model_type
    return formats.write_gguf(steering, out, hint, force)


def sweep(
    vector: VectorArg,
    model: ModelArg = None,
    *,
    layers: list[int] | None = None,
    site: str | None = None,
    coefs: list[float] = DEFAULT_COEFS,
    pairs: str | Path | list[ContrastPair] | None = None,
    prompts: TextsArg = None,
    out_png: str | Path | None = None,
    out_json: str | Path | None = None,
    force: bool = False,
    device: str = DEFAULT_DEVICE,
    model_dtype: str = DEFAULT_MODEL_DTYPE,
) -> SweepResult:
    """Behaviour score and KL to unsteered against the coefficient, with true addition (nothing compiled).

    Scores on ``pairs`` (the shipped happy/sad pairs when neither pairs nor prompts
    are given); KL on ``prompts`` where given, else on the pair texts.
    """
    for path in (out_png, out_json):
        if path is not None:
            check_writable(path, force)
    coefs = check_coefs(list(coefs))
    steering = _select(vector, layers, site)
    pair_list = _pairs(pairs, None, None)
    prompt_samples = corpus.load_texts(prompts, []) if prompts else None
    if pair_list is None and prompt_samples is None:
        pair_list = read_pairs(corpus.demo_pairs_path())
    loaded = _model(model, device, model_dtype)
    loaded.arch.site(steering.site)
    steering.validate(loaded)
    result = sweep_coefficients(loaded, steering, coefs, pair_list, prompt_samples)
    write_outputs(
        {
            out_json: lambda tmp: tmp.write_text(_json_text(result.to_dict())),
            out_png: lambda tmp: plot_sweep(result, tmp),
        },
        force,
    )
    return result


@dataclass
class CompileResult:
    adapter_dir: Path
    report: dict
    merged_dir: Path | None = None


def _steered_layers(report: dict) -> list[int]:
    """The layers of ``report['site']`` an adapter steers (the next-layer route's LoRAs sit one layer deeper)."""
    return [report["next_layer"]["layer"]] if report.get("next_layer") else [x["layer"] for x in report["layers"]]


def _model_card(report: dict) -> str:
    lines = [
        "# Steering adapter compiled by lora_compile",
        "",
        f"Base model: `{report['base_model']}`. A rank-1 LoRA that adds a steering vector at "
        f"`{report['site']}` of layer(s) {', '.join(str(layer) for layer in _steered_layers(report))}, "
        "in place of activation addition, for servers that run only LoRA adapters.",
        "",
        "| layer | writer | held-out RMS of b·x − 1 | max | first token | ‖coef·s‖ |",
        "|---|---|---|---|---|---|",
    ]
    for x in report["layers"]:
        e = x["fit_error"]["all"]
        lines.append(
            f"| {x['layer']} | {', '.join(x['writers'])} | {e['rms']:.4g} | {e['max']:.3g} | "
            f"{e['rms_first']:.3g} | {x['vector_norm']:.4g} |"
        )
    how = (
        "Exact: an embedding LoRA (`lora_embedding_A` = all ones) adds the vector to every token; nothing is fitted."
        if report.get("exact")
        else f"Calibration: {report['calibration']['tokens']} tokens; direction: {report['direction']}."
    )
    refined = report.get("refine")
    if refined:
        adapters = refined["heldout"]["adapters"]
        if refined.get("settled"):
            how += (
                f" Not refined: the closed form's KL ratio on a split of the calibration text, "
                f"{refined['kl_ratio_initial']:.3g}, was already below {refined['options']['settled_below']:.3g}; "
                f"held-out KL ratio {adapters['closed_form']['kl_ratio']:.3g}."
            )
        else:
            how += (
                f" Refined by gradient descent on KL(true addition ‖ adapter) ({refined['steps']} steps; kept the "
                f"{refined['kept'].replace('_', ' ')}): held-out KL ratio {adapters['closed_form']['kl_ratio']:.3g} "
                f"(closed form) → {adapters['refined']['kl_ratio']:.3g}; the fit-error columns are the closed form's."
            )
            if refined["kept"] == "refined" and refined.get("pattern_modules"):
                how += f" Refinement added LoRAs on {', '.join(f'`{m}`' for m in refined['pattern_modules'])}."
    if report.get("route_choice"):
        ratios = report["route_choice"]["validation_kl_ratio"]
        how += (
            f" Route chosen by KL ratio on a validation split of the calibration text: the writer's LoRA "
            f"{ratios['writer']:.3g}, the next-layer route {ratios['next_layer']:.3g}."
        )
    if report.get("next_layer"):
        n = report["next_layer"]
        how += (
            f" Next-layer route: the LoRAs write `{n['writes'][0]}` of layer {n['writes'][1]}, adding the vector plus "
            f"the mean response of that layer's attention to it (the table's errors are against that sum); held-out "
            f"KL ratio against true `{report['site']}` {n['layer']} steering: {n['heldout']['kl_ratio']:.3g}."
        )
    lines += [
        "",
        "The RMS column is the predicted relative error of the added vector per token. "
        f"`lora-compile verify` measures it against true activation addition. {how}",
        "",
        f"Serving target: `{report['target']}` (rank {report['rank']}, zero-padded; {report['dtype']} tensors). "
        f"`lora-compile check` lints the adapter against every target.",
        "",
    ]
    return "\n".join(lines)


def compile_adapter(
    vector: VectorArg,
    out_dir: str | Path,
    model: ModelArg = None,
    *,
    layers: list[int] | None = None,
    site: str | None = None,
    coef: float = 1.0,
    direction: str = "ridge",
    ridge: float | None = None,
    texts: TextsArg = None,
    heldout: TextsArg = None,
    self_generated: int = 0,
    seed: int = 0,
    force: bool = False,
    calibration: Calibration | None = None,
    target: str = DEFAULT_TARGET,
    dtype: str | None = None,
    base_model_id: str | None = None,
    sequential: bool = True,
    merge_dir: str | Path | None = None,
    device: str = DEFAULT_DEVICE,
    model_dtype: str = DEFAULT_MODEL_DTYPE,
    moments: MomentsArg = None,
    approximate: bool = False,
    refine: bool = False,
    refine_options: RefineOptions | None = None,
    route: str = "writer",
) -> CompileResult:
    """Compile a steering vector into a rank-1 PEFT LoRA adapter at ``out_dir``, shaped for ``target``.

    ``dtype``: of the saved tensors (default: the target's); ``base_model_id``: the served model's
    id, written as ``base_model_name_or_path`` (default: the loaded model's id).

    ``sequential`` (several layers): calibrate and fit in layer order, each layer under
    the compiled deltas of the earlier ones, since steering early moves every later
    writer's inputs; False calibrates every layer on the unsteered model. A passed
    ``calibration`` (e.g. from scan) then serves only the first layer; the others are
    calibrated again on ``texts``. Fit errors are measured on ``heldout`` with the
    compiled deltas of all layers applied, as the served model sees them. ``resid_pre`` (an
    embedding LoRA) is exact: nothing is calibrated or fitted. ``merge_dir``: also write the
    base model with the adapter merged into its weights there. ``device``/``model_dtype``: where
    and in what precision a model named by ``model`` is loaded; the report's ``memory`` has the
    peak memory of the compile. ``moments``: moments files (``calibrate_moments``) to fit from
    instead of calibrating (sequential multi-layer: they serve the first layer, as ``calibration``).
    Under torchrun the ranks share the calibration; rank 0 measures the held-out error and writes.
    ``approximate``: compile a site behind a post-writer norm (Gemma 2/3,
    OLMo 2), refused otherwise; the report's ``post_norm`` says what the construction achieves.

    ``refine``: start from the closed form and minimise KL(true addition ‖ adapter) on the
    calibration text (``refine.train_lora``; ``refine_options`` sets its budget and rank), keeping
    the closed form where that does not help on a validation split of the calibration text. The
    report's ``refine`` has the KL ratio on ``heldout`` before and after, per domain. ``resid_pre``
    is exact already: refinement is skipped there, with a warning.

    ``route`` (``resid_mid`` of architectures with a value projection): ``"writer"`` compiles the
    writer's LoRA alone; ``"both"`` adds the value route (``routes.fit_value_route``: a second
    rank-1 LoRA on the value projection, the writer's LoRA carrying the rest); ``"auto"`` keeps the
    value route at each layer where its held-out error is below the writer's alone. Each layer's
    report has ``route`` and ``value_route`` (both routes' held-out errors). Three more passes
    per layer; not with a sequential multi-layer compile. ``"next_layer"`` (``resid_post L``, one
    layer): the adapter writes ``resid_mid L+1`` instead (``routes.next_layer_steering``: the vector
    plus layer L+1's attention's mean response to it, compiled there with ``"auto"``); the report's
    ``next_layer`` has the held-out KL ratio against true ``resid_post L`` steering, which is also
    what refinement minimises and what ``verify`` compares with. ``"auto"`` at one ``resid_post``
    layer with a layer after it compiles both the writer's LoRA and the next-layer route and keeps
    the one with the lower KL ratio against true steering on the refinement's validation split of
    the calibration text (the report's ``route_choice``; about twice the compile's time).
    """
    check_writable(out_dir, force)
    check_route(route)
    options = refine_options or RefineOptions()
    options.check()
    if options.rank != 1 and not refine:
        raise LoraCompileError(
            f"--rank {options.rank} needs --refine: the closed form is rank 1 (the best any rank does for a constant)"
        )
    if merge_dir is not None:
        check_writable(merge_dir, force)
    prof = profile(target)
    prof.check_dtype(dtype or prof.default_dtype)
    prof.rank_for(options.rank if refine else 1)
    if not torch.isfinite(torch.tensor(coef)):
        raise LoraCompileError(f"coefficient {coef} is not a finite number")
    check_direction_method(direction)
    steering = _select(vector, layers, site)
    prof.check_site(steering.site)
    loaded = _model(model, device, model_dtype)
    with peak_memory(loaded.devices) as peak:
        return _compile(
            loaded, steering, out_dir, prof, peak, coef=coef, direction=direction, ridge=ridge, texts=texts,
            heldout=heldout, self_generated=self_generated, seed=seed, force=force, calibration=calibration,
            dtype=dtype, base_model_id=base_model_id, sequential=sequential, merge_dir=merge_dir, moments=moments,
            approximate=approximate, refine_options=options if refine else None, route=route,
        )  # fmt: skip


@dataclass
class _ClosedForm:
    """A compile's closed form, before refinement: the fitted sites and the report's account of them."""

    steered: list[SiteWeights]
    layers: list[dict]  # the report's per-layer entries
    factors: Factors  # every LoRA's (A, B): the writers', and the value route's where kept
    calibration: Calibration
    files: dict  # the moments files fitted from (the report's calibration entry)
    direction: str  # the fit method, "exact" for an embedding LoRA
    sequential: bool
    exact: bool

    @property
    def writers_only(self) -> bool:
        """No value route kept: ``factors`` are the writers' alone."""
        return not any(layer.get("route") == "both" for layer in self.layers)


def _compile(
    loaded: LoadedModel,
    steering: SteeringVector,
    out_dir: str | Path,
    prof: TargetProfile,
    peak: PeakMemory,
    *,
    coef: float,
    direction: str,
    ridge: float | None,
    texts: TextsArg,
    heldout: TextsArg,
    self_generated: int,
    seed: int,
    force: bool,
    calibration: Calibration | None,
    dtype: str | None,
    base_model_id: str | None,
    sequential: bool,
    merge_dir: str | Path | None,
    moments: MomentsArg = None,
    approximate: bool = False,
    refine_options: RefineOptions | None = None,
    route: str = "writer",
) -> CompileResult:
    warnings = []
    if base_model_id is None and loaded.is_local:
        warnings.append(
            f"base_model_name_or_path is the local name {loaded.model_id!r}: servers and hosted APIs match "
            "adapters to the served model's id, pass --base-model-id (e.g. the Hugging Face id)"
        )
    loaded.arch.site(steering.site)
    steering.validate(loaded)
    reason = loaded.arch.approximate_reason(steering.site)
    if reason is not None and not approximate:
        raise LoraCompileError(f"{reason}: pass --approximate to compile it anyway and measure it with verify")
    samples_cache: list = []

    def samples() -> list[corpus.Sample]:
        if not samples_cache:
            samples_cache.append(calibration_samples(loaded, texts, self_generated, seed))
        return samples_cache[0]

    heldout_samples = corpus.load_texts(heldout, corpus.default_heldout())

    def closed_form(
        at: SteeringVector, at_route: str, given: Calibration | None, files: MomentsArg
    ) -> _ClosedForm | None:
        return _closed_form(
            loaded, at, coef, at_route, samples, heldout_samples, direction=direction, ridge=ridge,
            calibration=given, moments=files, sequential=sequential,
        )  # fmt: skip

    # What the adapter must imitate: refinement and held-out KL are measured against it. The
    # next-layer route compiles another vector (resid_mid L+1) standing in for it.
    reference, next_layer, route_choice = steering, None, None
    if route == "next_layer":
        steering, next_layer = next_layer_steering(loaded, steering, coef, encode(loaded, samples()))
        form = closed_form(steering, "auto", calibration, moments)
    elif route == "auto" and _next_layer_possible(loaded, steering):
        # Both routes into resid_post, on every rank (each calibration is shared under torchrun);
        # the given calibration or moments files are resid_post's: resid_mid L+1 is calibrated here.
        stand_in, next_layer = next_layer_steering(loaded, steering, coef, encode(loaded, samples()))
        form = closed_form(steering, "writer", calibration, moments)
        other = closed_form(stand_in, "auto", None, None)
        if form is not None and other is not None:
            route_choice = _post_route_choice(
                loaded, reference, coef, samples(), refine_options or RefineOptions(), form.factors, other.factors
            )
            if route_choice["kept"] == "next_layer":
                steering, form = stand_in, other
            else:
                next_layer = None
    else:
        form = closed_form(steering, route, calibration, moments)
    if form is None:  # the other torchrun ranks only helped calibrate
        return CompileResult(Path(out_dir), {})

    factors, refined = form.factors, None
    if refine_options is not None and form.exact:
        warnings.append(f"--refine skipped: {steering.site} is exact (an embedding LoRA), there is nothing to refine")
    elif refine_options is not None:
        # Where the value route was kept, the writer's LoRA alone is measured too: what the route bought.
        writer_only = {} if form.writers_only else {"writer_only": writer_factors(loaded, form.steered)}
        # Through layer L+1, the vector also moves that layer's attention pattern token by token.
        pattern = loaded.arch.pattern_modules(*next_layer["writes"]) if next_layer and refine_options.pattern else ()
        factors, refined = _refine(
            loaded, reference, coef, form.factors, samples(), heldout_samples, refine_options, writer_only, pattern
        )
    if next_layer is not None:
        # Its fit errors are against its own stand-in vector: the route is judged by held-out KL
        # against the resid_post addition it stands in for (measured by the refinement already).
        measured = refined["heldout"] if refined else None
        if measured is None:
            measured = heldout_kl(loaded, reference, heldout_samples, {"closed_form": form.factors}, coef=coef)
        next_layer["heldout"] = measured["adapters"]["closed_form"]
    tensors = adapter_tensors(loaded, form.steered, prof, dtype, factors=factors)
    predicted_error = max(_kept_error(x) for x in form.layers)
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors})
    base_model = base_model_id or loaded.model_id
    rank = max([a.shape[0] for a, _ in factors.values()], default=1)
    config = adapter_config(base_model, targets, prof, loaded.arch.fan_in_fan_out, rank)
    report = {
        "base_model": base_model,
        "target": prof.name,
        "dtype": dtype or prof.default_dtype,
        "warnings": warnings,
        "site": reference.site,
        "coef": coef,
        "direction": form.direction,
        "sequential": form.sequential,
        "exact": form.exact,
        "approximate": reason,
        "calibration": {
            "tokens": form.calibration.tokens,
            "domains": form.calibration.domains,
            "self_generated": self_generated,
            "fixed_prefix": form.calibration.fixed_prefix,
            **form.files,
        },
        "heldout_domains": sorted({s.domain for s in heldout_samples}),
        "predicted_delta_rel_error": predicted_error,
        # The next-layer route's error is not the stand-in's fit error: its KL is measured instead.
        "predicted_kl_ratio": 0.0 if form.exact else None if next_layer else predicted_kl_ratio(predicted_error),
        "layers": form.layers,
        "next_layer": next_layer,
        "route_choice": route_choice,
        "vector_metadata": steering.metadata,
        "rank": config["r"],
        "target_modules": targets,
        "model_dtype": str(loaded.dtype).removeprefix("torch."),
        "refine": refined,
        # Up to here (the merged copy, if any, comes after): the compile's own peak.
        "memory": peak.read().to_dict(),
    }
    # The adapter and the merged model are committed together: an interrupted merge leaves neither.
    with atomic_outputs([out_dir] + ([merge_dir] if merge_dir is not None else []), force, directory=True) as temps:
        write_adapter_files(temps[0], tensors, config, report, _model_card(report))
        if merge_dir is not None:
            save_merged(merged_model(loaded, adapter_deltas(temps[0])), loaded, temps[1])
    return CompileResult(Path(out_dir), report, Path(merge_dir) if merge_dir is not None else None)


def _closed_form(
    loaded: LoadedModel,
    steering: SteeringVector,
    coef: float,
    route: str,
    samples: Callable[[], list[corpus.Sample]],
    heldout_samples: list[corpus.Sample],
    *,
    direction: str,
    ridge: float | None,
    calibration: Calibration | None,
    moments: MomentsArg,
    sequential: bool,
) -> _ClosedForm | None:
    """Calibrate and fit ``coef·steering`` (``route``: the value route at ``resid_mid``), with each
    layer's held-out fit error; None on the torchrun ranks other than 0, which only help calibrate."""
    reason = loaded.arch.approximate_reason(steering.site)
    keys = [(steering.site, layer) for layer in steering.layers]
    vectors = {k: coef * steering.directions[k[1]] for k in keys}
    lambdas: dict = {}

    # Behind a post-writer norm the LoRA adds (a·x)·β with x = h/rms(y): β is chosen so the norm
    # turns rms(y)·β into ≈ s (fit.fit_post_norm_vector), on the unsteered model's writer outputs.
    writer_vectors = dict(vectors)
    post_norm_fits = {}
    if reason is not None:
        for k in keys:
            gain, eps = post_norm_gain(loaded, k)
            post_norm_fits[k] = fit_post_norm_vector(writer_outputs(loaded, samples(), k), gain, eps, vectors[k])
            writer_vectors[k] = post_norm_fits[k].vector

    def fit(key, moments):
        lambdas[key] = ridge if ridge is not None else choose_ridge(moments)
        return fit_direction(moments, direction, lambdas[key])

    exact = loaded.arch.site(steering.site).embedding
    sequential = sequential and len(keys) > 1 and not exact
    value_routes = _value_route_keys(loaded, keys, route, sequential, reason is not None)
    files: dict = {}
    if exact:
        # An embedding LoRA's input is a one-hot token: b = 1 gives b·x = 1 exactly, nothing to fit.
        vocab = loaded.module(loaded.arch.writers(*keys[0])[0]).num_embeddings
        directions = {k: torch.ones(vocab, dtype=torch.float64) for k in keys}
        calibration = Calibration(loaded.model_id, {}, 0, {}, [])
        projections = {k: exact_projections(loaded, heldout_samples) for k in keys}
        direction = "exact"
    else:
        if moments:
            # Sequential: the files serve the shallowest layer; the later ones are calibrated under its delta.
            needed = sorted(keys, key=lambda k: (k[1], k[0]))[:1] if sequential else keys
            calibration, files = _file_calibration(moments, loaded, needed)
        if sequential:
            calibration, directions = calibrate_sequential(loaded, samples(), writer_vectors, fit, calibration)
        else:
            if calibration is None or not set(keys) <= calibration.moments.keys():
                calibration = calibrate(loaded, samples(), keys)
            directions = {k: fit(k, calibration.moments[k]) for k in keys}
        if not distributed.is_main():
            return None
        with compiled_deltas(loaded, {k: (directions[k], writer_vectors[k]) for k in keys}):
            projections = project_inputs(loaded, heldout_samples, {k: d[None] for k, d in directions.items()})
    directions = {k: d.cpu() for k, d in directions.items()}  # fitted where the moments were; emitted on the CPU
    route_fits = {}
    if value_routes:
        calibration_tokens, heldout_tokens = encode(loaded, samples()), encode(loaded, heldout_samples)
        heldout_domains = [s.domain for s in heldout_samples]
        for k in value_routes:
            route_fits[k] = fit_value_route(
                loaded, k, vectors[k], calibration_tokens, heldout_tokens, heldout_domains, ridge
            )
    steered, layer_reports, value_factors = [], [], {}
    for key in keys:
        steered.append(SiteWeights(key[0], key[1], directions[key], writer_vectors[key]))
        layer_reports.append(
            {
                "layer": key[1],
                "writers": list(loaded.arch.writers(*key)),
                "fit_error": {d: e.to_dict() for d, e in fit_errors(projections[key]).items()},
                "vector_norm": float(vectors[key].norm()),
                "direction_norm": float(directions[key].norm()),
                "ridge": lambdas.get(key) if direction == "ridge" else None,
                "route": "writer",
            }
        )
        if key in route_fits:
            kept = _keeps_value_route(route, route_fits[key], layer_reports[-1]["fit_error"]["all"]["rms"])
            layer_reports[-1]["value_route"] = {**route_fits[key].to_dict(), "kept": kept}
            if kept:
                layer_reports[-1]["route"] = "both"
                value_factors.update(route_fits[key].factors())
        if key in post_norm_fits:
            layer_reports[-1]["post_norm"] = {
                "module": loaded.arch.post_norm(*key),
                "writer_vector_norm": float(writer_vectors[key].norm()),
                **post_norm_fits[key].to_dict(),
            }
    return _ClosedForm(
        steered=steered,
        layers=layer_reports,
        factors={**writer_factors(loaded, steered), **value_factors},
        calibration=calibration,
        files=files,
        direction=direction,
        sequential=sequential,
        exact=exact,
    )


def _next_layer_possible(loaded: LoadedModel, steering: SteeringVector) -> bool:
    """Whether ``--route auto`` weighs the next-layer route: one ``resid_post`` layer with a usable layer after it."""
    if steering.site != "resid_post" or len(steering.layers) != 1:
        return False
    try:
        next_layer_site(loaded, (steering.site, steering.layers[0]))
    except LoraCompileError:
        return False
    return True


def _post_route_choice(
    loaded: LoadedModel,
    steering: SteeringVector,
    coef: float,
    samples: list[corpus.Sample],
    options: RefineOptions,
    writer: Factors,
    next_layer: Factors,
) -> dict:
    """``--route auto`` at ``resid_post``: the writer's closed form or the next-layer route's, whichever
    has the lower KL ratio against true steering on the refinement's validation split of the
    calibration text (never the held-out text the report measures on)."""
    try:
        validation = split_samples(samples, options)[1]
    except LoraCompileError:  # a single calibration text: judged on it
        validation = samples
    measured = heldout_kl(
        loaded, steering, validation, {"writer": writer, "next_layer": next_layer}, coef=coef,
        max_tokens=options.max_tokens,
    )  # fmt: skip
    ratios = {name: m["kl_ratio"] for name, m in measured["adapters"].items()}
    return {"validation_kl_ratio": ratios, "kept": min(ratios, key=ratios.get)}


def _value_route_keys(loaded: LoadedModel, keys: list, route: str, sequential: bool, post_norm: bool) -> list:
    """The sites where the value route is fitted; a one-line error where ``route="both"`` cannot be."""
    if route == "writer":
        return []
    if sequential:
        raise LoraCompileError(
            f"--route {route} is not calibrated sequentially yet: pass --independent, or compile one layer"
        )
    usable = []
    for key in keys:
        try:
            if post_norm:
                raise LoraCompileError(f"{key[0]} {key[1]} is behind a post-writer norm: no value route")
            value_route_modules(loaded, key)
        except LoraCompileError as err:
            if route == "both":
                raise LoraCompileError(f"--route both: {err}; use --route writer") from None
            continue
        usable.append(key)
    return usable


def _keeps_value_route(route: str, fit: ValueRouteFit, writer_error: float) -> bool:
    return route == "both" or fit.heldout_error["all"] < writer_error


def _kept_error(layer_report: dict) -> float:
    """Held-out relative error of the added vector by the route the layer kept."""
    if layer_report["route"] == "both":
        return layer_report["value_route"]["heldout_error"]["all"]
    return layer_report["fit_error"]["all"]["rms"]


def _refine(
    loaded: LoadedModel,
    steering: SteeringVector,
    coef: float,
    closed: Factors,
    samples: list[corpus.Sample],
    heldout_samples: list[corpus.Sample],
    options: RefineOptions,
    baselines: dict[str, Factors],
    extra_modules: tuple[str, ...] = (),
) -> tuple[dict, dict]:
    """Refined factors (or the closed form's ``closed``, where refinement did not help) and the report's ``refine``.

    ``baselines``: further factors measured in the same held-out pass (named as in the report).
    ``extra_modules``: modules refinement may add LoRAs on (starting at B = 0).
    """
    result = train_lora(
        loaded, steering, samples, coef=coef, init="closed_form", factors=closed, options=options,
        extra_modules=extra_modules,
    )  # fmt: skip
    kept = "refined" if result.best_step > 0 else "closed_form"
    factors = balanced(result.factors) if kept == "refined" else closed
    start = time.perf_counter()
    measured = {**baselines, "closed_form": closed} | ({"refined": factors} if kept == "refined" else {})
    heldout = heldout_kl(loaded, steering, heldout_samples, measured, coef=coef)
    heldout["adapters"].setdefault("refined", heldout["adapters"]["closed_form"])  # kept: the same factors
    report = {
        **result.to_dict(),
        "kept": kept,
        "pattern_modules": list(extra_modules),  # in the adapter where the refined factors were kept
        "options": dataclasses.asdict(options),
        "heldout": heldout,
        "heldout_seconds": time.perf_counter() - start,
    }
    return factors, report


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    model: ModelArg = None,
    *,
    force: bool = False,
    device: str = DEFAULT_DEVICE,
    model_dtype: str = DEFAULT_MODEL_DTYPE,
) -> Path:
    """Write the base model with the adapter merged into its weights (``save_pretrained`` layout).

    For self-hosting without LoRA. The merge is done in float64 and rounded once to the model's
    dtype (``model_dtype``, so a bfloat16 load writes bfloat16 weights); tied embeddings are untied
    where an embedding LoRA is merged, so the output head is not steered.
    """
    check_writable(out_dir, force)
    deltas = adapter_deltas(adapter_dir)  # read first: a bad adapter is refused before loading the model
    return write_merged(_model(model, device, model_dtype), deltas, out_dir, force)


def check_adapter(path: str | Path, target: str | None = None, model: ModelArg = None) -> dict[str, list[str]]:
    """Lint any PEFT LoRA adapter against the serving targets: {target: problems}, empty lists pass.

    ``target``: one profile (default: all). Shapes are checked against ``model`` (a loaded model,
    an id, directory or .gguf: only its config is read), else against the embedded model when
    the adapter names it, else against a local directory it names; otherwise only against ``r``.
    """
    profiles = [profile(target)] if target is not None else list(PROFILES.values())
    adapter = read_adapter(path)
    base = None
    if isinstance(model, LoadedModel):
        base = model.model
    else:
        named = adapter.config.get("base_model_name_or_path")
        if model is None and named == DEFAULT_MODEL_ID:
            base = meta_model(load_config(None))
        elif model is not None or (isinstance(named, str) and Path(named).is_dir()):
            base = meta_model(load_config(model or named))
    return {p.name: lint(adapter, p, base) for p in profiles}


def verify_adapter(
    adapter_dir: str | Path,
    vector: VectorArg,
    model: ModelArg = None,
    *,
    prompts: TextsArg = None,
    coef: float | None = None,
    generations: int = 3,
    max_new_tokens: int = 32,
    dtype: str = "float32",
    device: str = DEFAULT_DEVICE,
    model_dtype: str = DEFAULT_MODEL_DTYPE,
) -> VerifyReport:
    """Compare the adapter (loaded with PEFT) with true addition on held-out prompts.

    Site, layers and coefficient come from the adapter's compile report where it has one.
    ``dtype`` (float32, bfloat16, float16): the base model, the adapter and the reference all
    run in it, as a server runs them (a cast copy of the model; the model passed in is kept).
    Below float32, both are also compared with true addition in float32, which separates
    the adapter's error from the dtype's own rounding (``kl_excess_ratio``). ``device``/``model_dtype``:
    where and in what precision a model named by ``model`` is loaded (the float32 copy is then a cast
    of those weights).
    """
    served = torch_dtype(dtype)
    adapter_dir = Path(adapter_dir)
    read_adapter(adapter_dir)  # refused before any model is loaded: no config, not safetensors, unreadable
    steering, coef = _adapter_steering(adapter_dir, _vector(vector), coef)
    base = _model(model, device, model_dtype)
    float32_model = base.in_dtype(torch.float32)
    loaded = base if base.dtype == served else float32_model.in_dtype(served)
    steering.validate(loaded)
    samples = corpus.load_texts(prompts, corpus.default_heldout())
    chats = [s for s in samples if s.is_chat][:generations]
    reference = float32_model if loaded is not float32_model else None
    return verify(loaded, adapter_dir, steering, samples, coef, chats, max_new_tokens, reference)


def _adapter_steering(adapter_dir: str | Path | None, steering: SteeringVector, coef: float | None):
    """Site, layers and coefficient from the adapter's compile report where there is one."""
    if adapter_dir is not None:
        report_path = Path(adapter_dir) / REPORT
        if report_path.is_file():
            report = json.loads(report_path.read_text())
            layers = _steered_layers(report)
            steering = SteeringVector(steering.select(layers).directions, report["site"], steering.metadata)
            coef = report["coef"] if coef is None else coef
    return steering, 1.0 if coef is None else coef


def convert_adapter_to_gguf(
    adapter_dir: str | Path,
    out: str | Path,
    model: str | None = None,
    *,
    outtype: str = "f32",
    llama_cpp: str | Path | None = None,
    force: bool = False,
) -> Path:
    """A compiled adapter as a GGUF LoRA for llama.cpp, made by llama.cpp's own converter.

    ``model``: the base model (default the embedded one); only its config is read.
    ``llama_cpp``: a llama.cpp source directory holding ``convert_lora_to_gguf.py`` (default:
    $LORA_COMPILE_LLAMA_CPP, else where ``scripts/setup_engine.sh`` puts it).
    """
    from .engine import convert_to_gguf

    check_writable(out, force)
    adapter = read_adapter(Path(adapter_dir))
    if any(".lora_embedding_" in key for key in adapter.tensors):
        # Measured with llama-cpp-python 0.3.36: its converter takes the embedding LoRA, and llama.cpp
        # then aborts the process at the first token (GGML_ASSERT(ggml_can_mul_mat(a, b))).
        raise LoraCompileError(
            f"{adapter_dir} is an embedding LoRA (resid_pre 0): llama.cpp aborts on it after conversion "
            "(GGML_ASSERT in ggml_can_mul_mat, llama.cpp 0.3.36); serve it with PEFT, vLLM or SGLang, "
            "or compile at resid_post / resid_mid for llama.cpp"
        )
    return convert_to_gguf(adapter_dir, out, load_config(model), outtype=outtype, llama_cpp=llama_cpp, force=force)


def verify_endpoint(
    url: str,
    served_model: str,
    vector: VectorArg,
    model: ModelArg = None,
    *,
    adapter: str | Path | None = None,
    prompts: TextsArg = None,
    coef: float | None = None,
    top_k: int = 20,
    generations: int = 3,
    max_new_tokens: int = 32,
    timeout: float = 60.0,
    retries: int = 3,
    api_key_env: str | None = None,
    alignment: str = "auto",
    device: str = DEFAULT_DEVICE,
    model_dtype: str = DEFAULT_MODEL_DTYPE,
):
    """Check an adapter served at an OpenAI-compatible endpoint against true addition computed here.

    ``adapter``: the adapter directory that was deployed, read only for its compile report
    (site, layers, coefficient); without it the vector's own site and ``coef`` are used. The API
    key comes from ``api_key_env``, else $LORA_COMPILE_API_KEY, else $OPENAI_API_KEY.
    Returns an ``endpoint.EndpointReport``.
    """
    from .endpoint import EndpointClient, api_key, check_model
    from .endpoint import verify_endpoint as run

    if top_k < 1:
        raise LoraCompileError(f"--top-k {top_k}: ask for at least 1 logprob per position")
    if timeout <= 0 or retries < 0:
        raise LoraCompileError("--timeout must be positive and --retries not negative")
    client = EndpointClient(url, api_key(api_key_env), timeout=timeout, retries=retries)
    if adapter is not None:
        read_adapter(Path(adapter))
    steering, coef = _adapter_steering(adapter, _vector(vector), coef)
    samples = corpus.load_texts(prompts, corpus.default_heldout())
    notes = check_model(client, served_model)  # an unreachable server or a wrong name fails before the model loads
    loaded = _model(model, device, model_dtype)
    steering.validate(loaded)
    chats = [s for s in samples if s.is_chat][:generations]
    return run(client, served_model, loaded, steering, samples, coef, chats, max_new_tokens, top_k, notes, alignment)
