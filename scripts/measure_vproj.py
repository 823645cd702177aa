"""The value route into resid_mid (a rank-1 LoRA on ``v_proj``) against the writer route (``o_proj``).

A LoRA ``B·(a·x)`` on ``v_proj`` changes head h's output at token i by ``(a·z^h_i)·B^g(h)``,
``z^h_i = Σ_j α^h_ij x_j`` (attention weights sum to 1), and ``o_proj`` maps that into the
stream: what reaches ``resid_mid`` is ``Σ_h (a·z^h_i) c_h`` (``fit.value_route``). Only the part
of the vector in the span of ``o_proj`` over the repeated KV heads is reachable; the rest
would still go through ``o_proj``. ``a`` is a ridge fit of ``Σ_i ‖C (Z_i a − 1)‖²`` on the shipped
calibration text (λ by two-fold cross-validation), for the vector it carries.

Per layer, the held-out relative error ``‖Δ_i − v‖/‖v‖`` (RMS over the shipped held-out tokens)
of: the o_proj route alone (today's compile); the value route on the part it reaches; both
(the value route for its part, o_proj for the rest), for the happy/sad vector at that layer.

With ``--verify``, both adapters are also judged as ``verify`` judges any adapter (PEFT-loaded,
against true addition, on the held-out set): today's compiled ``o_proj`` adapter, and one with
the value-route LoRA on ``v_proj`` plus the rest on ``o_proj``.

    python scripts/measure_vproj.py [--layers 4,10,18] [--coef 4] [--verify]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from lora_compile import api
from lora_compile.calibrate import Moments, encode, stream_attention_averaged
from lora_compile.corpus import default_calibration, default_heldout, demo_pairs_path
from lora_compile.fit import add_value_route_moments, fit_ridge, value_route
from lora_compile.models import load_model
from lora_compile.vectors import SteeringVector

SITE = "resid_mid"


def measure_layer(loaded, layer: int, vector: torch.Tensor, calibration, heldout) -> dict:
    writer = loaded.arch.writers(SITE, layer)[0]
    route = value_route(loaded.module(writer).weight, loaded.attention_shape, vector)
    d, d_writer = loaded.hidden_size, loaded.module(writer).in_features

    def fitted(parts: list[Moments]) -> torch.Tensor:
        whole = parts[0] + parts[1]
        whole.fold = parts[1]  # two folds: λ by cross-validation, as compile chooses it
        return fit_ridge(whole, pin=False)

    value_parts = [Moments.zeros(d), Moments.zeros(d)]
    plain_parts = [Moments.zeros(d_writer), Moments.zeros(d_writer)]
    for batch, mask, z, u in stream_attention_averaged(loaded, SITE, layer, calibration, f"layer {layer}"):
        for row, i in enumerate(batch):
            add_value_route_moments(value_parts[i % 2], z[row][mask[row]], route)
            plain_parts[i % 2].add_(u[row][mask[row]])
    a, b = fitted(value_parts), fitted(plain_parts)
    # With both LoRAs, o_proj's LoRA sees its input shifted by the value LoRA: fit it there.
    shifted_parts = [Moments.zeros(d_writer), Moments.zeros(d_writer)]
    for batch, mask, z, u in stream_attention_averaged(loaded, SITE, layer, calibration, f"layer {layer}, shifted"):
        for row, i in enumerate(batch):
            zr = z[row][mask[row]]
            shifted_parts[i % 2].add_(u[row][mask[row]].to(torch.float64) + route.writer_input_shift(zr, a))
    b_both = fitted(shifted_parts)
    v = vector.to(torch.float64)
    reach = route.per_head.sum(1)
    sums = {"writer": 0.0, "value": 0.0, "both": 0.0}
    count = 0
    for _, mask, z, u in stream_attention_averaged(loaded, SITE, layer, heldout, f"layer {layer} held-out"):
        zt, ut = z[mask], u[mask].to(torch.float64)
        value_error = (zt @ a - 1) @ route.per_head.T  # [N, d]
        writer_error = (ut @ b - 1)[:, None]  # [N, 1], per unit of vector
        shifted_error = ((ut + route.writer_input_shift(zt, a)) @ b_both - 1)[:, None]
        sums["writer"] += float(writer_error.pow(2).sum()) * float(v @ v)
        sums["value"] += float(value_error.pow(2).sum())
        sums["both"] += float((value_error + shifted_error * route.rest).pow(2).sum())
        count += int(mask.sum())
    return {
        "a": a,
        "b_both": b_both,
        "route": route,
        "layer": layer,
        "writer": (sums["writer"] / count / float(v @ v)) ** 0.5,
        "reached": route.reached,
        "value": (sums["value"] / count / float(reach @ reach)) ** 0.5,
        "both": (sums["both"] / count / float(v @ v)) ** 0.5,
    }


def verify_routes(loaded, layer: int, direction: torch.Tensor, coef: float, fitted: dict) -> tuple[float, float]:
    """KL ratios (o_proj adapter as compiled today, value route + o_proj) on the shipped held-out set."""
    from peft import LoraConfig, get_peft_model

    at_site = SteeringVector({layer: direction}, SITE)
    _, values = loaded.arch.attention_route(SITE, layer)
    writer = loaded.arch.writers(SITE, layer)[0]
    route = fitted["route"]
    with tempfile.TemporaryDirectory() as tmp:
        today = api.compile_adapter(at_site, Path(tmp) / "writer", loaded, coef=coef, target="peft")
        writer_kl = api.verify_adapter(today.adapter_dir, at_site, loaded, coef=coef, generations=0).kl_ratio
        model = get_peft_model(
            copy.deepcopy(loaded.model), LoraConfig(r=1, lora_alpha=1, target_modules=[values, writer])
        )
        for name, a, b in ((values, fitted["a"], route.values_b), (writer, fitted["b_both"], route.rest)):
            lora = model.base_model.model.get_submodule(name)
            lora.lora_A["default"].weight.data = a[None].float()
            lora.lora_B["default"].weight.data = b[:, None].float()
        model.save_pretrained(Path(tmp) / "both")
        both_kl = api.verify_adapter(Path(tmp) / "both", at_site, loaded, coef=coef, generations=0).kl_ratio
    return writer_kl, both_kl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="2,6,10,14,18,22,26,29")
    parser.add_argument("--coef", type=float, default=4.0)
    parser.add_argument("--verify", action="store_true", help="also measure both adapters' KL ratios with PEFT")
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    loaded = load_model()
    vector = api.extract_vector(demo_pairs_path(), layers, loaded)
    calibration = encode(loaded, default_calibration())
    heldout = encode(loaded, default_heldout())
    print(
        "| layer | o_proj alone | value route reaches (of ‖v‖²) | value route on its part | both |"
        + (" KL ratio, o_proj | KL ratio, both |" if args.verify else "")
        + " time |"
    )
    print("|---|---|---|---|---|" + ("---|---|" if args.verify else "") + "---|")
    for layer in layers:
        start = time.time()
        r = measure_layer(loaded, layer, args.coef * vector.directions[layer], calibration, heldout)
        kls = ""
        if args.verify:
            writer_kl, both_kl = verify_routes(loaded, layer, vector.directions[layer], args.coef, r)
            kls = f" {writer_kl:.2g} | {both_kl:.2g} |"
        print(
            f"| {layer} | {r['writer']:.4f} | {r['reached']:.0%} | {r['value']:.4f} | {r['both']:.4f} |{kls}"
            f" {time.time() - start:.0f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
