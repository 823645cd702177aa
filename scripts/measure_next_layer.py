"""How much of ``resid_post L`` steering layer L+1's attention could deliver (a route not built yet).

Adding ``v`` at ``resid_post L`` is adding it to the stream entering layer L+1: ``resid_mid L+1``
then gains ``v`` plus attention's response to it (``Δ_i``, what layer L+1's attention output
changes by at token i). A LoRA writing ``resid_mid L+1`` (``o_proj``, the value route) adds one
vector at every token; the best constant is ``v + mean_i Δ_i``, measured here on the shipped
calibration text (true addition at ``resid_post L``, layer L+1's attention output captured).
Printed per layer, as held-out KL ratios against true ``resid_post L`` steering:

- ``v``: true addition of ``v`` at ``resid_mid L+1`` (attention's response ignored);
- ``v + mean Δ``: true addition of the best constant there (what a perfect writer would leave);
- with ``--compile``: the adapter ``compile --site resid_mid --layers L+1 --route auto`` builds
  for that vector (coefficient folded in), loaded with PEFT.

Happy/sad vector, coefficient 4, shipped held-out set. README "Refinement".

    python scripts/measure_next_layer.py [--layers 6,10,14,22] [--coef 4] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel

from lora_compile import api, corpus
from lora_compile.calibrate import encode, padded_batches
from lora_compile.models import load_model
from lora_compile.vectors import SteeringVector
from lora_compile.verify import VERIFY_MAX_TOKENS, token_kl, true_addition


def _logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()]


def mean_attention_response(loaded, post: SteeringVector, coef: float, token_lists: list[list[int]]) -> torch.Tensor:
    """Mean over tokens of what layer L+1's attention output changes by when ``coef·v`` is added at ``resid_post L``."""
    (layer,) = post.directions
    module = loaded.module(loaded.arch.hook_module("resid_mid", layer + 1))
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    total, count = torch.zeros(loaded.hidden_size, dtype=torch.float64), 0
    try:
        with torch.no_grad():
            for _, ids, mask in padded_batches(token_lists, loaded.tokenizer.pad_token_id, 4096):
                seen.clear()
                loaded.model(input_ids=ids, attention_mask=mask, use_cache=False)
                with true_addition(loaded, post, coef):
                    loaded.model(input_ids=ids, attention_mask=mask, use_cache=False)
                change = (seen[1] - seen[0]).to(torch.float64)[mask.bool()]
                total, count = total + change.sum(0), count + change.shape[0]
    finally:
        handle.remove()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="6,10,14,22")
    parser.add_argument("--coef", type=float, default=4.0)
    parser.add_argument("--compile", action="store_true", help="also compile the resid_mid L+1 adapter and measure it")
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    loaded = load_model(device="cpu")
    vector = api.extract_vector(corpus.demo_pairs_path(), layers, loaded)
    calibration = encode(loaded, api.calibration_samples(loaded), 128)
    heldout = encode(loaded, corpus.default_heldout(), VERIFY_MAX_TOKENS)
    print("layer  held-out KL ratio against true resid_post L: resid_mid L+1 with v | v + mean Δ | compiled")
    for layer in layers:
        post = SteeringVector({layer: vector.directions[layer]}, "resid_post", dict(vector.metadata))
        v = args.coef * vector.directions[layer].to(torch.float64)
        response = mean_attention_response(loaded, post, args.coef, calibration)
        stand_ins = {
            "v": SteeringVector({layer + 1: v.float()}, "resid_mid"),
            "v + mean Δ": SteeringVector({layer + 1: (v + response).float()}, "resid_mid", dict(vector.metadata)),
        }
        adapted = None
        with tempfile.TemporaryDirectory() as tmp:
            if args.compile:
                start = time.perf_counter()
                api.compile_adapter(stand_ins["v + mean Δ"], Path(tmp) / "a", loaded, coef=1.0, route="auto")
                print(f"  compile of resid_mid {layer + 1}: {time.perf_counter() - start:.0f} s", flush=True)
                adapted = PeftModel.from_pretrained(copy.deepcopy(loaded.model), str(Path(tmp) / "a")).eval()
            kl: dict[str, list[torch.Tensor]] = {k: [] for k in (*stand_ins, "unsteered", "compiled")}
            with torch.no_grad():
                for _, ids, mask in padded_batches(heldout, loaded.tokenizer.pad_token_id, 2048):
                    with true_addition(loaded, post, args.coef):
                        target = _logits(loaded.model, ids, mask)
                    kl["unsteered"].append(token_kl(target, _logits(loaded.model, ids, mask)))
                    for name, stand_in in stand_ins.items():
                        with true_addition(loaded, stand_in, 1.0):
                            kl[name].append(token_kl(target, _logits(loaded.model, ids, mask)))
                    if adapted is not None:
                        kl["compiled"].append(token_kl(target, _logits(adapted, ids, mask)))
        unsteered = torch.cat(kl["unsteered"]).mean()
        ratios = [
            f"{float(torch.cat(kl[k]).mean() / unsteered):.3g}" if kl[k] else "–" for k in (*stand_ins, "compiled")
        ]
        size = float(response.norm() / v.norm())
        print(f"{layer:5d}  {' | '.join(ratios)}   (|mean Δ| / |v| = {size:.2f})", flush=True)


if __name__ == "__main__":
    main()
