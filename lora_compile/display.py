"""What the command line and the demo print: rich tables of scan, compile, verify, check and sweep results."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from .verify import VerifyReport

# Not a terminal (a log, CI): wide enough that the scan table keeps one row per site.
out = Console(width=None if sys.stdout.isatty() else 130)


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def scan_table(result: dict, top: int = 3) -> Table:
    table = Table(title=f"scan: held-out RMS of b·x − 1 ({result['model']})")
    for col in (
        "site",
        "layer",
        "ridge rms",
        "KL ratio ≈",
        "ridge max",
        "ridge first",
        "axis rms",
        "axis/ridge",
        "worst domain",
        "outlier dims (mean/std)",
    ):
        table.add_column(col, justify="right" if col not in ("site", "worst domain") else "left")
    best = {(r["site"], r["layer"]) for r in result["recommended"]}
    for r in sorted(result["sites"], key=lambda r: (r["site"], r["layer"])):
        ridge, axis = r["ridge"]["all"], r["axis"]["all"]
        domains = {d: v["rms"] for d, v in r["ridge"].items() if d != "all"}
        worst = max(domains, key=domains.get)
        dims = ", ".join(f"{d['dim']}:{d['mean_over_std']:.1f}" for d in r["outlier_dims"][:top])
        style = "bold green" if (r["site"], r["layer"]) in best else None
        table.add_row(
            r["site"],
            str(r["layer"]),
            _fmt(ridge["rms"]),
            _fmt(r["predicted_kl_ratio"]),
            _fmt(ridge["max"]),
            _fmt(ridge["rms_first"]),
            _fmt(axis["rms"]),
            f"{axis['rms'] / ridge['rms']:.1f}",
            f"{worst} {_fmt(domains[worst])}",
            dims,
            style=style,
        )
    return table


def print_scan(result: dict) -> None:
    out.print(scan_table(result))
    ratios = ", ".join(f"{s} {v:.1f}×" for s, v in result["median_axis_over_ridge"].items())
    out.print(f"median axis/ridge error: {ratios}; KL ratio ≈: predicted from the ridge error (README)")
    recs = "; ".join(f"{r['site']} {r['layer']} (rms {_fmt(r['rms'])})" for r in result["recommended"])
    out.print(f"[bold]recommended sites:[/bold] {recs}")
    for reason in result.get("approximate", {}).values():
        out.print(f"approximate: {reason} (compile needs --approximate)")
    routed = [r for r in result["sites"] if "value_route" in r]
    if routed:
        table = Table(title="the value route at resid_mid (compile --route both / auto), for this vector")
        for col in ("layer", "o_proj alone", "value route + o_proj", "reaches (of ‖v‖²)", "KL ratio ≈"):
            table.add_column(col, justify="right")
        for r in sorted(routed, key=lambda r: r["layer"]):
            v = r["value_route"]
            both = _fmt(v["heldout_error"]["all"])
            wins = v["heldout_error"]["all"] < r["ridge"]["all"]["rms"]
            table.add_row(
                str(r["layer"]),
                _fmt(r["ridge"]["all"]["rms"]),
                f"[bold green]{both}[/bold green]" if wins else both,
                f"{v['reached']:.0%}",
                _fmt(v["predicted_kl_ratio"]),
            )
        out.print(table)


def verify_table(report: VerifyReport) -> Table:
    table = Table(title=f"verify: compiled adapter vs true activation addition ({report.dtype})")
    for col in ("domain", "tokens", "KL(true‖compiled)", "KL(true‖unsteered)", "ratio", "top-1 agree"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    for d, v in report.per_domain.items():
        table.add_row(
            d,
            str(v["tokens"]),
            _fmt(v["kl_compiled"]),
            _fmt(v["kl_unsteered"]),
            _fmt(v["kl_ratio"]),
            f"{v['top1_agreement']:.1%}",
        )
    table.add_row(
        "[bold]all[/bold]",
        str(report.tokens),
        _fmt(report.kl_compiled),
        _fmt(report.kl_unsteered),
        f"[bold]{_fmt(report.kl_ratio)}[/bold]",
        f"{report.top1_agreement:.1%}",
    )
    return table


def print_verify(report: VerifyReport) -> None:
    out.print(verify_table(report))
    if report.delta_rel_error is None:
        out.print("added-vector error: not measured (the adapter has no LoRA on the site's writers: judged by KL)")
    else:
        out.print(
            f"added-vector relative error per token: rms {_fmt(report.delta_rel_error)} "
            f"(first token {_fmt(report.delta_rel_error_first)})"
        )
    if report.kl_dtype_floor is not None:
        out.print(
            f"against true addition in float32: KL {_fmt(report.kl_compiled_vs_float32)} compiled in {report.dtype}, "
            f"{_fmt(report.kl_dtype_floor)} true addition in {report.dtype} (the dtype's own floor); "
            f"excess ratio {_fmt(report.kl_excess_ratio)} ± {_fmt(1.96 * report.kl_excess_ratio_se)} "
            f"(95% interval, paired per token over {report.prompts} prompts)"
        )
    for g in report.generations:
        out.print(f"greedy agreement: {g['tokens_agreeing']}/{g['tokens']} tokens  [dim]{g['prompt'][:70]}[/dim]")


def print_memory(memory: dict) -> None:
    line = f"{memory['device']}: peak memory {memory['peak_gib']:.2f} GiB ({memory['measure']})"
    if "layer_groups" in memory:
        held, every = memory["moments_bytes_largest_group"] / 2**30, memory["moments_bytes_all_layers"] / 2**30
        line += (
            f"; moments {held:.2f} GiB held at once ({len(memory['layer_groups'])} group(s) of layers; "
            f"all layers at once: {every:.2f} GiB)"
        )
    out.print(line)


def print_refine(refine: dict) -> None:
    heldout = refine["heldout"]
    adapters = heldout["adapters"]
    table = Table(title="refinement: held-out KL(true‖adapter) / KL(true‖unsteered)")
    # writer_only: the writer's LoRA alone, measured where the value route was kept.
    names = [k for k in ("writer_only", "closed_form", "refined") if k in adapters]
    table.add_column("domain")
    for name in names:
        table.add_column(name.replace("_", " ").replace("writer only", "writer alone"), justify="right")
    for domain in adapters["closed_form"]["per_domain"]:
        table.add_row(domain, *(_fmt(adapters[k]["per_domain"][domain]) for k in names))
    table.add_row("all", *(_fmt(adapters[k]["kl_ratio"]) for k in names), style="bold")
    out.print(table)
    if refine.get("settled"):
        out.print(
            f"refinement: none needed: the closed form's KL ratio on {refine['val_tokens']} calibration tokens "
            f"held back, {_fmt(refine['kl_ratio_initial'])}, is at or below {refine['options']['settled_below']:g} "
            f"(kept the closed form; {refine['seconds']:.0f} s, held-out measure {refine['heldout_seconds']:.0f} s)"
        )
        return
    out.print(
        f"refinement: {refine['steps']} steps in {refine['seconds']:.0f} s (best at step {refine['best_step']}, "
        f"{refine['train_tokens']} calibration tokens, {refine['val_tokens']} held back to stop on: KL ratio "
        f"{_fmt(refine['kl_ratio_initial'])} → {_fmt(refine['kl_ratio_best'])}); "
        f"kept the {refine['kept'].replace('_', ' ')}; "
        f"held-out measure {refine['heldout_seconds']:.0f} s"
    )
    if refine.get("pattern_modules"):
        kept = "in the adapter" if refine["kept"] == "refined" else "not kept (the closed form was)"
        out.print(
            f"refinement also trained LoRAs on {', '.join(refine['pattern_modules'])} (the next layer's "
            f"attention pattern): {kept}"
        )


def _route_choice(choice: dict) -> str:
    ratios = choice["validation_kl_ratio"]
    return (
        f"kept the {choice['kept'].replace('_', '-')} route (KL ratio on the calibration text's validation split: "
        f"the writer's {_fmt(ratios['writer'])}, next-layer {_fmt(ratios['next_layer'])})"
    )


def print_compile(report: dict) -> None:
    table = Table(title=f"compiled at {report['site']} ({report['direction']} direction)")
    for col in ("layer", "writer", "predicted error (rms)", "max", "first token", "worst domain"):
        table.add_column(col, justify="left" if col in ("writer", "worst domain") else "right")
    for x in report["layers"]:
        e = x["fit_error"]
        domains = {d: v["rms"] for d, v in e.items() if d != "all"}
        worst = max(domains, key=domains.get)
        table.add_row(
            str(x["layer"]),
            ", ".join(x["writers"]),
            "0 (exact)" if report.get("exact") else _fmt(e["all"]["rms"]),
            _fmt(e["all"]["max"]),
            _fmt(e["all"]["rms_first"]),
            f"{worst} {_fmt(domains[worst])}",
        )
    out.print(table)
    if report.get("route_choice"):
        out.print(f"--route auto: {_route_choice(report['route_choice'])}")
    if report.get("next_layer"):
        n = report["next_layer"]
        out.print(
            f"next-layer route: resid_post {n['layer']} written at {n['writes'][0]} {n['writes'][1]} as v + mean Δ "
            f"(|coef·v| {_fmt(n['vector_norm'])}, |mean Δ| {_fmt(n['mean_response_norm'])}: layer {n['writes'][1]}'s "
            f"attention response); held-out KL ratio against true resid_post {n['layer']} steering "
            f"{_fmt(n['heldout']['kl_ratio'])} (the fit errors above are against v + mean Δ)"
        )
    elif not report.get("exact"):
        out.print(
            f"predicted held-out KL ratio ≈ {_fmt(report['predicted_kl_ratio'])} (from the error; verify measures it)"
        )
    for x in report["layers"]:
        if "value_route" in x:
            v = x["value_route"]
            out.print(
                f"layer {x['layer']}: value route via {v['values_module']} (reaches {v['reached']:.0%} of ‖v‖²): "
                f"held-out error {_fmt(v['heldout_error']['all'])} with it, {_fmt(x['fit_error']['all']['rms'])} "
                f"without: {'kept' if v['kept'] else 'not kept'}"
            )
    if report.get("approximate"):
        out.print(f"approximate: {report['approximate']}")
        for x in report["layers"]:
            p = x["post_norm"]
            out.print(
                f"  layer {x['layer']}: error of the delta through {p['module']} on calibration tokens "
                f"{_fmt(p['site_error'])} (first-order s/g: {_fmt(p['site_error_first_order'])}), "
                "on top of the fit error above"
            )


def print_endpoint(report) -> None:
    table = Table(
        title=f"verify: {report.served_model} at {report.url} vs true activation addition (top-{report.top_k})"
    )
    for col in ("tokens", "KL(true‖served), top-k", "KL(true‖unsteered), top-k", "ratio", "top-1 agree", "mass"):
        table.add_column(col, justify="right")
    table.add_row(
        str(report.tokens),
        _fmt(report.kl_compiled),
        _fmt(report.kl_unsteered),
        f"[bold]{_fmt(report.kl_ratio)}[/bold]",
        f"{report.top1_agreement:.1%}",
        f"{report.mass_covered:.3f}",
    )
    out.print(table)
    out.print(
        f"{report.prompts} prompts, {report.requests} requests; KL on the server's top-k set, both sides "
        "renormalised on it; echo alignment: " + ", ".join(f"{k} ({v} prompts)" for k, v in report.alignment.items())
    )
    for g in report.generations:
        out.print(f"greedy agreement: {g['tokens_agreeing']}/{g['tokens']} tokens  [dim]{g['prompt'][:70]}[/dim]")
    for missing in report.not_returned:
        out.print(f"[yellow]not returned:[/yellow] {missing}")


def check_table(results: dict[str, list[str]], chosen: str) -> Table:
    table = Table(title="check: will each serving target load this adapter as PEFT does?", show_lines=True)
    for col in ("target", "verdict", "reasons"):
        table.add_column(col, overflow="fold")
    for name, problems in results.items():
        verdict = "[green]pass[/green]" if not problems else "[red]fail[/red]"
        label = f"[bold]{name}[/bold] (chosen)" if name == chosen else name
        table.add_row(label, verdict, "\n".join(problems) or "-")
    return table


def dtype_summary(report: VerifyReport) -> dict:
    keys = ("kl_compiled", "kl_unsteered", "kl_ratio", "top1_agreement", "delta_rel_error", "tokens")
    floor = ("kl_dtype_floor", "kl_compiled_vs_float32", "kl_excess_ratio", "kl_excess_ratio_se")
    return {k: getattr(report, k) for k in keys + floor}


def dtype_table(reports: list[VerifyReport]) -> Table:
    table = Table(title="verify by served dtype (both sides in that dtype)")
    cols = ("dtype", "KL(true‖compiled)", "KL(true‖unsteered)", "ratio", "top-1 agree", "Δ rel error")
    for col in cols + ("dtype floor", "excess ratio"):
        table.add_column(col, justify="left" if col == "dtype" else "right")
    for r in reports:
        table.add_row(
            r.dtype,
            _fmt(r.kl_compiled),
            _fmt(r.kl_unsteered),
            _fmt(r.kl_ratio),
            f"{r.top1_agreement:.1%}",
            _fmt(r.delta_rel_error),
            "-" if r.kl_dtype_floor is None else _fmt(r.kl_dtype_floor),
            _fmt(r.kl_ratio if r.kl_excess_ratio is None else r.kl_excess_ratio),
        )
    return table


def separability_table(vector) -> Table:
    m = vector.metadata
    table = Table(title=f"separability of the {m.get('pairs')} pairs ({m.get('method')}, {m.get('position')} token)")
    for col in ("layer", "‖direction‖", "gap / pooled std", "pairs ordered"):
        table.add_column(col, justify="right")
    for layer, sep in sorted(vector.separability.items()):
        norm = float(vector.directions[layer].norm())
        table.add_row(str(layer), _fmt(norm), f"{sep['gap_over_std']:.2f}", f"{sep['ordered']:.0%}")
    return table


def print_sweep(result) -> None:
    table = Table(title=f"sweep: true addition at {result.site} layer(s) {', '.join(map(str, result.layers))}")
    for col in ("coef", "score (log-odds gap)", "pairs preferring positive", "KL to unsteered"):
        table.add_column(col, justify="right")
    for r in result.rows:
        scored = r["score"] is not None
        table.add_row(
            f"{r['coef']:g}",
            f"{r['score']:.3f}" if scored else "-",
            f"{r['ordered']:.0%}" if scored else "-",
            _fmt(r["kl"]),
        )
    out.print(table)
