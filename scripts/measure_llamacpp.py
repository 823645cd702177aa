"""The compiled adapter inside llama.cpp, against llama.cpp's own activation addition.

Reproduces the README's llama.cpp table:  python scripts/measure_llamacpp.py [--per-domain 3] [--best-layer N]
(needs scripts/setup_engine.sh). The demo vector (happy/sad, mean difference at resid_post, coefficient 4)
is compiled at the best resid_post layer (by scan's held-out fit error, unless --best-layer) and at
resid_post 10, converted with llama.cpp's converter, and the embedded GGUF run in llama.cpp three ways on
held-out prompts: plain, with the exported control vector at strength 4 (llama.cpp's own addition at
resid_post), and with the GGUF LoRA. KL ratio, top-1 and greedy agreement are computed as verify computes
them (its functions), beside local verify's figures on the same prompts. llama.cpp control vectors add at
resid_post only, so the resid_mid 18 adapter (and the resid_pre 0 embedding LoRA) are judged in llama.cpp
against local true addition, next to the engine's floor: llama.cpp unsteered against local unsteered.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lora_compile import api, corpus
from lora_compile.calibrate import calibrate, encode
from lora_compile.engine import LlamaCppModel
from lora_compile.extract import extract, read_pairs
from lora_compile.models import embedded_model_path, load_model
from lora_compile.vectors import SteeringVector
from lora_compile.verify import VERIFY_MAX_TOKENS, agreement, greedy, token_kl, true_addition


def subset(per_domain: int) -> list[corpus.Sample]:
    samples = corpus.default_heldout()
    return [s for d in sorted({s.domain for s in samples}) for s in [p for p in samples if p.domain == d][:per_domain]]


def greedy_agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, int]:
    return sum(agreement(x, y) for x, y in zip(a, b)), sum(len(x) for x in a)


def compare(reference: list[torch.Tensor], other: list[torch.Tensor], plain: list[torch.Tensor]) -> dict:
    """verify's figures: mean per-token KL(reference ‖ other) over KL(reference ‖ plain), top-1 agreement."""
    kl_o = torch.cat([token_kl(r, o) for r, o in zip(reference, other)])
    kl_u = torch.cat([token_kl(r, u) for r, u in zip(reference, plain)])
    top1 = torch.cat([r.argmax(-1) == o.argmax(-1) for r, o in zip(reference, other)])
    return {
        "kl": float(kl_o.mean()),
        "kl_unsteered": float(kl_u.mean()),
        "kl_ratio": float(kl_o.mean() / kl_u.mean()),
        "top1": float(top1.float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--coef", type=float, default=4.0)
    parser.add_argument("--per-domain", type=int, default=3, help="held-out prompts per domain")
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--best-layer", type=int, default=None, help="skip the resid_post scan")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    start = time.time()
    loaded = load_model()
    gguf_model = embedded_model_path()
    prompts = subset(args.per_domain)
    chats = [s for s in corpus.default_heldout() if s.is_chat][: args.generations]
    token_lists = encode(loaded, prompts, VERIFY_MAX_TOKENS)
    chat_ids = [s.token_ids(loaded.tokenizer, VERIFY_MAX_TOKENS, add_generation_prompt=True) for s in chats]
    n_tokens = sum(len(t) for t in token_lists)
    print(f"{len(prompts)} held-out prompts ({n_tokens} tokens), {len(chats)} greedy generations", flush=True)

    calibration = None
    best = args.best_layer
    if best is None:
        result, calibration = api.scan(loaded, sites=["resid_post"])
        best = result["recommended"][0]["layer"]
        print(f"best resid_post layer by scan: {best} (fit error {result['recommended'][0]['rms']:.3g})")
    vector = extract(loaded, read_pairs(corpus.demo_pairs_path()), sorted({best, 10, 18, 0}))

    def local(steering: SteeringVector | None) -> tuple[list[torch.Tensor], list[list[int]]]:
        logits, gens = [], []
        with torch.no_grad():
            for ids in token_lists:
                inp = torch.tensor([ids])
                if steering is None:
                    logits.append(loaded.model(input_ids=inp).logits[0])
                else:
                    with true_addition(loaded, steering, args.coef):
                        logits.append(loaded.model(input_ids=inp).logits[0])
            for ids in chat_ids:
                if steering is None:
                    gens.append(greedy(loaded.model, loaded, ids, args.max_new_tokens))
                else:
                    with true_addition(loaded, steering, args.coef):
                        gens.append(greedy(loaded.model, loaded, ids, args.max_new_tokens))
        return logits, gens

    def engine(**kwargs) -> tuple[list[torch.Tensor], list[list[int]]]:
        llm = LlamaCppModel(gguf_model, n_ctx=512, **kwargs)
        try:
            logits = [torch.from_numpy(llm.logits(ids)) for ids in token_lists]
            gens = [llm.greedy(ids, args.max_new_tokens) for ids in chat_ids]
        finally:
            llm.close()
        return logits, gens

    rows: dict[str, dict] = {}
    local_plain, _ = local(None)
    cpp_plain, _ = engine()
    floor = torch.cat([token_kl(a, b) for a, b in zip(local_plain, cpp_plain)])
    floor_top1 = torch.cat([a.argmax(-1) == b.argmax(-1) for a, b in zip(local_plain, cpp_plain)])
    rows["engine floor"] = {"kl": float(floor.mean()), "top1": float(floor_top1.float().mean())}
    kl_floor, top1_floor = float(floor.mean()), float(floor_top1.float().mean())
    print(f"engine floor: KL(local unsteered ‖ llama.cpp unsteered) {kl_floor:.3g}, top-1 {top1_floor:.1%}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sites = [("resid_post", best), ("resid_post", 10), ("resid_mid", 18), ("resid_pre", 0)]
        for site, layer in dict.fromkeys(sites):
            name = f"{site} {layer}"
            vec = SteeringVector({layer: vector.directions[layer]}, site)
            adapter = tmp / f"{site}-{layer}"
            cal = calibration if site == "resid_post" else None
            if site == "resid_mid":
                cal = calibrate(loaded, corpus.default_calibration(), [(site, layer)])
            target = "peft" if site == "resid_pre" else "portable"
            api.compile_adapter(vec, adapter, loaded, coef=args.coef, calibration=cal, target=target)
            report = api.verify_adapter(
                adapter, vec, loaded, prompts=prompts, generations=args.generations, max_new_tokens=args.max_new_tokens
            )
            row = {
                "local verify": {
                    "kl_ratio": report.kl_ratio,
                    "top1": report.top1_agreement,
                    "greedy": [
                        sum(g["tokens_agreeing"] for g in report.generations),
                        sum(g["tokens"] for g in report.generations),
                    ],
                }
            }
            lora = tmp / f"{site}-{layer}.gguf"
            try:
                api.convert_adapter_to_gguf(adapter, lora)
            except Exception as exc:  # what the converter says is the finding
                row["converter"] = f"refused: {exc}"
                rows[name] = row
                print(name, json.dumps(row), flush=True)
                continue
            cpp_lora, cpp_lora_gens = engine(lora=lora)
            true_logits, true_gens = local(vec)
            vs_local = compare(true_logits, cpp_lora, local_plain)
            vs_local["greedy"] = list(greedy_agreement(true_gens, cpp_lora_gens))
            row["llama.cpp LoRA vs local true addition"] = vs_local
            if site == "resid_post":
                cv = tmp / f"{site}-{layer}-cvec.gguf"
                api.export_gguf(vec, cv)
                cpp_cvec, cpp_cvec_gens = engine(control_vector=cv, strength=args.coef)
                inside = compare(cpp_cvec, cpp_lora, cpp_plain)
                inside["greedy"] = list(greedy_agreement(cpp_cvec_gens, cpp_lora_gens))
                row["llama.cpp LoRA vs llama.cpp control vector"] = inside
                cvec_vs_local = compare(true_logits, cpp_cvec, local_plain)
                cvec_vs_local["greedy"] = list(greedy_agreement(true_gens, cpp_cvec_gens))
                row["llama.cpp control vector vs local true addition"] = cvec_vs_local
            rows[name] = row
            print(name, json.dumps(row), flush=True)
    print(f"done in {time.time() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
