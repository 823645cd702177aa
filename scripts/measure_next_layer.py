"""The next-layer route into ``resid_post L`` measured: what attention's mean response buys, and the adapter.

Adding ``v`` at ``resid_post L`` is adding it to the stream entering layer L+1: ``resid_mid L+1``
then gains ``v`` plus attention's response to it (``Δ_i``, what layer L+1's attention output
changes by at token i). A LoRA writing ``resid_mid L+1`` (``o_proj``, the value route) adds one
vector at every token; the best constant is ``v + mean_i Δ_i``, measured on the shipped
calibration text (``routes.mean_attention_response``). Printed per layer, as held-out KL ratios
against true ``resid_post L`` steering:

- ``v``: true addition of ``v`` at ``resid_mid L+1`` (attention's response ignored);
- ``v + mean Δ``: true addition of the best constant there (what a perfect writer would leave);
- with ``--compile``: the adapter ``compile --route next_layer`` builds (its report's
  ``next_layer.heldout``); with ``--refine`` also refined (``compile --route next_layer --refine``),
  per domain.

Happy/sad vector, coefficient 4, shipped held-out set. README "The next-layer route".

    python scripts/measure_next_layer.py [--layers 6,10,14,22] [--coef 4] [--compile] [--refine]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lora_compile import api, corpus
from lora_compile.calibrate import encode, padded_batches
from lora_compile.models import load_model
from lora_compile.routes import mean_attention_response
from lora_compile.vectors import SteeringVector
from lora_compile.verify import VERIFY_MAX_TOKENS, token_kl, true_addition


def _logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()]


def _domains(measured: dict) -> str:
    return ", ".join(f"{d} {r:.3g}" for d, r in measured["per_domain"].items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="6,10,14,22")
    parser.add_argument("--coef", type=float, default=4.0)
    parser.add_argument("--compile", action="store_true", help="also compile --route next_layer and measure it")
    parser.add_argument("--refine", action="store_true", help="also refine that adapter (implies --compile)")
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    loaded = load_model(device="cpu")
    vector = api.extract_vector(corpus.demo_pairs_path(), layers, loaded)
    calibration = encode(loaded, api.calibration_samples(loaded), 128)
    heldout = encode(loaded, corpus.default_heldout(), VERIFY_MAX_TOKENS)
    print("layer  held-out KL ratio against true resid_post L: resid_mid L+1 with v | v + mean Δ")
    for layer in layers:
        post = SteeringVector({layer: vector.directions[layer]}, "resid_post", dict(vector.metadata))
        v = args.coef * vector.directions[layer].to(torch.float64)
        response = mean_attention_response(loaded, ("resid_post", layer), v, calibration)
        stand_ins = {
            "v": SteeringVector({layer + 1: v.float()}, "resid_mid"),
            "v + mean Δ": SteeringVector({layer + 1: (v + response).float()}, "resid_mid"),
        }
        kl: dict[str, list[torch.Tensor]] = {k: [] for k in (*stand_ins, "unsteered")}
        with torch.no_grad():
            for _, ids, mask in padded_batches(heldout, loaded.tokenizer.pad_token_id, 2048):
                with true_addition(loaded, post, args.coef):
                    target = _logits(loaded.model, ids, mask)
                kl["unsteered"].append(token_kl(target, _logits(loaded.model, ids, mask)))
                for name, stand_in in stand_ins.items():
                    with true_addition(loaded, stand_in, 1.0):
                        kl[name].append(token_kl(target, _logits(loaded.model, ids, mask)))
        unsteered = torch.cat(kl["unsteered"]).mean()
        ratios = [f"{float(torch.cat(kl[k]).mean() / unsteered):.3g}" for k in stand_ins]
        size = float(response.norm() / v.norm())
        print(f"{layer:5d}  {' | '.join(ratios)}   (|mean Δ| / |v| = {size:.2f})", flush=True)
        if not (args.compile or args.refine):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            report = api.compile_adapter(
                post, Path(tmp) / "a", loaded, coef=args.coef, route="next_layer", refine=args.refine
            ).report
        print(f"  compile --route next_layer{' --refine' * args.refine}: {time.perf_counter() - start:.0f} s")
        compiled = report["next_layer"]["heldout"]
        print(f"  compiled: {compiled['kl_ratio']:.3g} ({_domains(compiled)})", flush=True)
        if args.refine:
            refine = report["refine"]
            kept = refine["heldout"]["adapters"]["refined"]
            print(
                f"  refined: {kept['kl_ratio']:.3g} ({_domains(kept)}); kept the {refine['kept'].replace('_', ' ')}, "
                f"{refine['steps']} steps, validation {refine['kl_ratio_initial']:.3g} → {refine['kl_ratio_best']:.3g}",
                flush=True,
            )


if __name__ == "__main__":
    main()
