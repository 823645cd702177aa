"""repeng's own steering vs ours, for a control vector going through GGUF both ways.

Reproduces the README's numbers:  python scripts/measure_formats.py
Prints the largest logit difference between repeng's ControlModel and our true
addition on the embedded model, beside how far the steering moves the logits.
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch

import lora_compile as lc
from lora_compile.verify import true_addition

np.float_ = np.float64  # repeng 0.4 names np.float_ in annotations, removed in numpy 2
import repeng  # noqa: E402

del np.float_


def main() -> None:
    model = lc.load_model()
    ids = model.tokenizer("The weather report for tomorrow says that", return_tensors="pt").input_ids

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return model.model(input_ids=ids, use_cache=False).logits

    gen = torch.Generator().manual_seed(0)
    directions = {k: (3 * torch.randn(model.hidden_size, generator=gen)).numpy() for k in (4, 17)}
    plain = logits()
    with tempfile.TemporaryDirectory() as tmp:
        repeng.ControlVector(model_type="llama", directions=directions).export_gguf(f"{tmp}/repeng.gguf")
        vector = lc.import_vector(f"{tmp}/repeng.gguf", model=model)
        ours_gguf = lc.export_gguf(vector, f"{tmp}/ours.gguf", model=model)
        trips = (("repeng export, our import", f"{tmp}/repeng.gguf"), ("our export, repeng import", ours_gguf))
        for name, path in trips:
            control = repeng.ControlVector.import_gguf(str(path))
            wrapped = repeng.ControlModel(model.model, sorted(control.directions))
            try:
                wrapped.set_control(control, 1.0)
                theirs = logits()
            finally:
                wrapped.reset()
                wrapped.unwrap()
            with true_addition(model, vector):
                ours = logits()
            print(
                f"{name}: max |ours - repeng| = {(ours - theirs).abs().max():.3g}, "
                f"max |steered - plain| = {(theirs - plain).abs().max():.3g}, "
                f"‖vector‖ = {', '.join(f'{float(v.norm()):.3g}' for v in vector.directions.values())}"
            )


if __name__ == "__main__":
    main()
