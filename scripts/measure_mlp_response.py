"""How much of ``resid_post L`` steering a route before layer L's MLP could deliver.

Adds the vector exactly (true addition) at ``resid_mid L`` and measures the held-out KL ratio
against true ``resid_post L`` steering, KL(post ‖ mid) / KL(post ‖ unsteered): what any route
writing before the MLP (o_proj, the value route) would leave at best, since the MLP then sees
the vector. README "Refinement".

    python scripts/measure_mlp_response.py [--layers 6,10,14,22] [--coef 4]
"""

from __future__ import annotations

import argparse

import torch

from lora_compile import api, corpus
from lora_compile.calibrate import encode, padded_batches
from lora_compile.models import load_model
from lora_compile.refine import _Runner
from lora_compile.vectors import SteeringVector
from lora_compile.verify import VERIFY_MAX_TOKENS, token_kl, true_addition


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="6,10,14,22")
    parser.add_argument("--coef", type=float, default=4.0)
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    loaded = load_model(device="cpu")
    vector = api.extract_vector(corpus.demo_pairs_path(), layers, loaded)
    token_lists = encode(loaded, corpus.default_heldout(), VERIFY_MAX_TOKENS)
    print("layer  KL ratio of resid_mid L standing in for resid_post L")
    for layer in layers:
        post, mid = (SteeringVector({layer: vector.directions[layer]}, site) for site in ("resid_post", "resid_mid"))
        runner = _Runner(loaded, layer)
        unsteered, stand_in = [], []
        with torch.no_grad():
            for indices, ids, mask in padded_batches(token_lists, loaded.tokenizer.pad_token_id, 2048):
                batch = runner.batch(indices, ids, mask)
                plain = runner.logits(batch)
                with true_addition(loaded, post, args.coef):
                    target = runner.logits(batch)
                with true_addition(loaded, mid, args.coef):
                    before_mlp = runner.logits(batch)
                unsteered.append(token_kl(target, plain))
                stand_in.append(token_kl(target, before_mlp))
        ratio = float(torch.cat(stand_in).mean() / torch.cat(unsteered).mean())
        print(f"{layer:5d}  {ratio:.3g}", flush=True)


if __name__ == "__main__":
    main()
