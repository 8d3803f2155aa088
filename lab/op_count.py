"""How many kernels one training step launches, and where: the cost that sets the pace of a
launch-bound GPU step.

    python -m lab.op_count --config paper            # per part, and the most frequent ops
    python -m lab.op_count --config tiny --amp off
    python -m lab.op_count --config paper --json results/op_count/paper.json   # also as JSON

Why count: on one H200 (results/bench_gpu) the paper preset's eager training step took 173 ms at
batch 8 and 159 ms at batch 32, while its kernels kept the GPU busy for only 52 ms at batch 32. The
step time hardly depends on the batch because the host, issuing one kernel per aten op, is the
bottleneck. So the number of ops per step, which torch.compile, CUDA graphs and fusion reduce, is the
figure to watch, and it can be taken on any CPU: a TorchDispatchMode sees every aten op that
autograd, autocast and the modules issue. Views (view, transpose, expand, ...) launch no kernel and
are left out. Host-device syncs (`.item()`, `nonzero`, `bool(tensor)`) are listed on their own: each
stalls the GPU queue, and any one of them stops CUDA-graph capture.

The step is train.py's (tmc.step.TrainStep): with --amp bf16 it runs on bf16 working weights without
autocast, as on the GPU; the optimizer is fused Adam, as on the GPU. Where the CPU takes another kernel
than CUDA the counts differ: attention with dropout or with a bias that needs a gradient (BERT, Swin's
relative-position bias) is written out on the CPU (tmc.attention.attend: about four ops forward and
seven backward) where CUDA runs one fused kernel each way.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.module_tracker import ModuleTracker

from lab.flops import PARTS
from lab.workload import make_batch, make_model, make_train_step, step_inputs

# Aten ops that only make a new view of the same memory: no kernel.
VIEWS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice",
         "select", "alias", "as_strided", "detach", "split", "split_with_sizes", "unbind", "narrow",
         "unflatten", "lift_fresh", "_reshape_alias", "view_as_real", "view_as_complex"}
# Aten ops that read a tensor's value on the host: a device sync on the GPU.
SYNCS = {"_local_scalar_dense", "nonzero", "is_nonzero", "masked_select", "equal", "_unique2", "unique_dim"}
OWNER = {child: part for part, children in PARTS.items() for child in children}  # "swin" → "swin"


class OpCounter(TorchDispatchMode):
    """Counts kernel-launching aten ops by (phase, part, op) while active. `phase` is set by the caller
    ("forward", "backward", "optimizer"); the forward part comes from the innermost tracked module."""

    def __init__(self, tracker: ModuleTracker | None = None):
        super().__init__()
        self.tracker, self.phase = tracker, "forward"
        self.ops: collections.Counter = collections.Counter()
        self.syncs: collections.Counter = collections.Counter()

    def part(self) -> str:
        if self.phase != "forward" or self.tracker is None:
            return self.phase
        for name in self.tracker.parents:  # e.g. "TMC.swin.layers.0"; "Global" is always there
            child = name.split(".")[1] if name.startswith("TMC.") else ""
            if child in OWNER:
                return OWNER[child]
        return "other (losses, glue)"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCS:
            self.syncs[(self.part(), name)] += 1
        if name not in VIEWS:
            self.ops[(self.phase, self.part(), name)] += 1
        return func(*args, **(kwargs or {}))


def count_training_step(preset: str = "paper", batch: int = 2, amp: str = "bf16") -> dict:
    """Ops of the second of two training steps (the first builds optimizer state) of bench's step, the
    one train.py runs (tmc.step.TrainStep: bf16 working weights for amp "bf16", fused Adam):
    {"total", "per_part", "top_ops", "ops" (every op's count), "syncs"}."""
    torch.manual_seed(0)
    cfg, model = make_model(preset)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    data = step_inputs(make_batch(model, cfg.image_size, batch, torch.device("cpu")))
    step = make_train_step(model, optimizer, None, amp, cfg.alignment_form)
    step(data)
    with ModuleTracker() as tracker, OpCounter(tracker) as counter:
        step.on_phase = lambda phase: setattr(counter, "phase", phase)
        step(data)
    per_part = collections.Counter()
    for (phase, part, _), n in counter.ops.items():
        per_part[part] += n
    top = collections.Counter()
    for (_, _, name), n in counter.ops.items():
        top[name] += n
    return {"preset": preset, "batch": batch, "amp": amp, "total": sum(counter.ops.values()),
            "per_part": dict(per_part.most_common()), "top_ops": dict(top.most_common(12)), "ops": dict(top),
            "syncs": {f"{part}: {name}": n for (part, name), n in counter.syncs.items()}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="paper", choices=["paper", "tiny"])
    p.add_argument("--batch", type=int, default=2, help="the counts do not depend on it")
    p.add_argument("--amp", default="bf16", choices=["bf16", "off"])
    p.add_argument("--json", type=Path, help="also write the counts here")
    args = p.parse_args(argv)
    r = count_training_step(args.config, args.batch, args.amp)
    if args.json:
        command = "python -m lab.op_count " + " ".join(argv if argv is not None else sys.argv[1:])
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, **r}, indent=1) + "\n")
    print(f"TMC preset {r['preset']!r}, amp {r['amp']}: {r['total']} kernel-launching aten ops per training step")
    for part, n in r["per_part"].items():
        print(f"  {part:<22} {n:6d}")
    print("most frequent:", ", ".join(f"{k} {v}" for k, v in r["top_ops"].items()))
    print("host-device syncs:", r["syncs"] or "none")


if __name__ == "__main__":
    main()
