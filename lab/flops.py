"""FLOPs of TMC, counted by torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add of matmuls,
convolutions and attention), in total and per part (Swin, text encoder, MCM, alignment, decoder)."""
from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lab.workload import make_batch

# Top-level module names → the parts of count_parameters (text_proj belongs to MCM there).
PARTS = {"swin": ("swin",), "text_encoder": ("text",), "mcm": ("mcm", "text_proj"),
         "alignment": ("align",), "decoder": ("decoder",)}


def part_flops(counts: dict[str, dict], root: str = "TMC") -> dict[str, int]:
    """FLOPs per part from FlopCounterMode.get_flop_counts(); valid for a forward pass only.

    Only modules called through __call__ appear (Swin runs through `forward_stage`: `TMC.swin.layers.0` is
    there, `TMC.swin` is not), so a part is its entry or the sum of its outermost descendants that are.
    The rest (TMC.forward itself, a loss) is "other". Not for backward, where ModuleTracker credits a
    module with whatever autograd interleaves between its output's and its input's gradients.
    """
    totals = {name: sum(ops.values()) for name, ops in counts.items()}

    def module(prefix: str) -> int:
        if prefix in totals:
            return totals[prefix]
        inside = [k for k in totals if k.startswith(prefix + ".")]
        return sum(totals[k] for k in inside if not any(k.startswith(o + ".") for o in inside))

    parts = {part: sum(module(f"{root}.{child}") for child in children) for part, children in PARTS.items()}
    parts["other"] = totals.get("Global", 0) - sum(parts.values())
    return parts


def count_flops(fn) -> tuple[int, dict[str, int]]:
    """(total FLOPs, FLOPs per part) of fn(), attention counted through the math SDPA backend."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops(), part_flops(counter.get_flop_counts())


def forward_flops(model, image_size: int, batch: int = 1, per_part: bool = False):
    """Forward FLOPs (2·MAC) of one batch with a T-token caption [and their split per part]."""
    image, _, tokens, _ = make_batch(model, image_size, batch, next(model.parameters()).device)
    was_training = model.training
    with torch.no_grad():
        total, parts = count_flops(lambda: model.eval()(image, **tokens))
    model.train(was_training)
    return (total, parts) if per_part else total
