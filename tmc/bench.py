"""Size and speed of a TMC configuration.

    python -m tmc.bench --config paper --count          # parameters per part + forward FLOPs at 224²

FLOPs are counted by torch.utils.flop_counter (2 FLOPs per multiply-add, matmuls, convolutions and
attention; element-wise work is not counted). Papers that quote "FLOPs" from thop/fvcore count
multiply-adds, i.e. half of this number.
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from tmc.config import get_config
from tmc.model import build_model, count_parameters

PAPER_PARAMS = 242.8e6
PAPER_GFLOPS = 145.7


def forward_flops(model, image_size: int, batch: int = 1) -> int:
    """Forward FLOPs (2·MAC) of one batch with a T-token caption, counted by FlopCounterMode."""
    image = torch.rand(batch, 1, image_size, image_size)
    tokens = model.tokenize(["bilateral pulmonary infection, two infected areas, upper left lung."] * batch)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(image, **tokens)
    return counter.get_total_flops()


def count(preset: str, text_model: str | None = None) -> dict:
    overrides = {"text_model": text_model} if text_model else {}
    if preset == "paper" and not text_model:
        overrides["text_model"] = "random:12x768"  # BERT-base's shape; no download needed to count
    cfg = get_config(preset, **overrides)
    model = build_model(cfg).eval()
    params = count_parameters(model)
    flops = forward_flops(model, cfg.image_size)
    return {"preset": preset, "image_size": cfg.image_size, "text_model": cfg.text_model,
            "params": params, "forward_gflops_2mac": flops / 1e9, "forward_gmacs": flops / 2e9}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="paper", help="preset: paper or tiny")
    p.add_argument("--text-model", default=None)
    p.add_argument("--count", action="store_true", help="parameters and forward FLOPs")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    result = count(args.config, args.text_model)
    params = result["params"]
    print(f"TMC preset {args.config!r} at {result['image_size']}², text encoder {result['text_model']}")
    for part, n in params.items():
        print(f"  {part:<13} {n / 1e6:9.2f} M")
    print(f"  forward       {result['forward_gflops_2mac']:9.2f} GFLOPs (2·MAC)  = "
          f"{result['forward_gmacs']:.2f} GMACs")
    if args.config == "paper":
        print(f"  paper         {PAPER_PARAMS / 1e6:9.2f} M, {PAPER_GFLOPS} GFLOPs "
              f"(ours/paper: params {params['total'] / PAPER_PARAMS:.3f}, "
              f"2·MAC {result['forward_gflops_2mac'] / PAPER_GFLOPS:.3f}, MAC {result['forward_gmacs'] / PAPER_GFLOPS:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
