"""The training and evaluation loops, and what they need: seeding and RNG state, and the
evaluation protocols (per image, global, per case; defined in tmc.metrics).

train.py and eval.py are thin command lines around these functions, so the same code runs on a
CPU, one GPU, or `torchrun --nproc_per_node N`. Evaluation thresholds sigmoid probabilities at 0.5
at the model's input size; empty-vs-empty scores 1.0 by default (`empty=nan`: nnU-Net's rule).

Shape key: B batch, H, W spatial, T text tokens.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from tmc.distributed import Dist, all_reduce_sum, gather_lists
from tmc.losses import caption_positive_mask, multistage_alignment_loss, segmentation_loss
from tmc.metrics import THRESHOLD, confusion, global_scores, mean_scores, per_case_scores
from tmc.precision import autocast, step_precision
from tmc.step import TrainStep
from tmc.train_config import TrainConfig


# ---------------------------------------------------------------------------- seeding and RNG state

def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng(generators: dict[str, torch.Generator]) -> dict:
    """Every RNG state as tensors, numbers and lists (loadable with weights_only=True)."""
    version, py_state, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator]) -> None:
    """Inverse of `capture_rng`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in generators.items():
        if name in state["generators"]:
            g.set_state(state["generators"][name])


def default_workers(limit: int = 4) -> int:
    """DataLoader workers when none are asked for: the CPU cores this process may use, at most
    `limit` (more only compete with the main process on a small machine)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(limit, cores))


# ---------------------------------------------------------------------------- training

class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class NonFiniteGuard:
    """Counts skipped steps; stops the run after `limit` non-finite losses in a row."""
    limit: int = 20
    in_a_row: int = 0
    total: int = 0

    def update(self, finite: bool) -> None:
        self.observe(0, 0, 0) if finite else self.observe(self.in_a_row + 1, self.in_a_row + 1, 1)

    def observe(self, in_a_row: int, longest: int, skipped: int) -> None:
        """Counts read from the device: the current run of skips, the longest run since the last
        read, and the skips since then."""
        self.in_a_row = in_a_row
        self.total += skipped
        if self.limit and max(longest, in_a_row) >= self.limit:
            self.in_a_row = max(longest, in_a_row)
            raise NonFiniteLossError(
                f"{self.in_a_row} non-finite losses in a row ({self.total} in total): training "
                f"diverged; fix: lower --lr, use --amp bf16 instead of fp16, or --grad-clip 1.0")


def _float_alignment(stages: list[dict]) -> list[dict]:
    """Alignment outputs in float32: the losses' exp/logsigmoid are fragile in half precision."""
    return [{k: v.float() if torch.is_tensor(v) else v for k, v in s.items()} for s in stages]


def compute_loss(out: dict, mask: torch.Tensor, positives: torch.Tensor, seg_loss_kind: str,
                 alignment_weight: float, alignment_form: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L = L_seg + λ·L_align (paper §3.4); `positives` (B, B) from caption_positive_mask. Returns
    (loss, seg, align), 0-d tensors."""
    seg = segmentation_loss(out["logits"].float(), mask, kind=seg_loss_kind)
    if out["alignment"] and alignment_weight > 0:
        align = multistage_alignment_loss(_float_alignment(out["alignment"]), alignment_form, positives)
    else:
        align = torch.zeros((), device=mask.device)
    return seg + alignment_weight * align, seg, align


def make_train_step(model, optimizer, scaler, cfg: TrainConfig, *, device: torch.device,
                    alignment_form: str = "sigmoid", dist: Dist | None = None):
    """The tmc.step.TrainStep of train.py's objective with cfg's amp, seg_loss, alignment_weight and
    grad_clip (built once, reused by every epoch)."""
    dist = dist or Dist()

    def loss_fn(out, batch):
        return compute_loss(out, batch["mask"], batch["positives"], cfg.seg_loss, cfg.alignment_weight,
                            alignment_form)

    precision = step_precision(cfg.amp, device, dist.enabled or cfg.compile)
    return TrainStep(model, optimizer, loss_fn, precision=precision, scaler=scaler, grad_clip=cfg.grad_clip,
                     world_size=dist.world_size)


@dataclass
class EpochTotals:
    """One host read of an epoch's running sums."""
    loss: float  # sum of loss·B over the finite steps
    seg: float  # sum of seg·B
    align: float  # sum of align·B
    images: float  # images in the finite steps
    skipped: float  # non-finite steps
    in_a_row: float  # the current run of skipped steps
    longest: float  # the longest run since the previous read


class EpochSums:
    """An epoch's running sums, kept on the device in one tensor so that a step adds to them without
    a host sync and the host reads them in one copy. Each field is a named view of that tensor."""

    def __init__(self, device: torch.device, in_a_row: int):
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.device = device
        self.buffer = torch.zeros(7, device=device, dtype=dtype)  # the fields of EpochTotals, in order
        self.weighted = self.buffer[:4]  # loss·B, seg·B, align·B, images
        self.skipped = self.buffer[4]
        self.in_a_row = self.buffer[5]
        self.longest = self.buffer[6]
        self.in_a_row.fill_(in_a_row)  # a run of skips continues across epochs
        self.reported = 0  # skips already passed to the guard

    def add(self, out: dict, B: int) -> None:
        """Add one step's outputs ("loss", "seg", "align", "finite"; 0-d device tensors) for B images."""
        ok = out["finite"].to(self.buffer.dtype)
        self.weighted += torch.stack([out["loss"] * B, out["seg"] * B, out["align"] * B,
                                      torch.full((), B, device=self.device)]).to(self.buffer.dtype) * ok
        self.skipped += 1 - ok
        self.in_a_row.copy_((self.in_a_row + 1) * (1 - ok))
        self.longest.copy_(torch.maximum(self.longest, self.in_a_row))

    def read(self, guard: NonFiniteGuard) -> EpochTotals:
        """One host read; the guard raises on a long run of skips."""
        v = EpochTotals(*self.buffer.tolist())
        self.longest.copy_(self.in_a_row)  # the longest run restarts from the current one
        guard.observe(in_a_row=int(v.in_a_row), longest=int(v.longest), skipped=int(v.skipped) - self.reported)
        self.reported = int(v.skipped)
        return v


def train_one_epoch(step, loader, *, device: torch.device, tokenize, guard: NonFiniteGuard,
                    augment_fn=None, caption_fn=None, aug_generator: torch.Generator | None = None,
                    max_steps: int = 0,
                    dist: Dist | None = None, desc: str = "", progress: bool = True,
                    deadline: float | None = None, read_every: int = 10) -> dict:
    """One pass over `loader` (or `max_steps` batches, or until the `deadline`).

    Args:
        step: a tmc.step.TrainStep (`make_train_step`) or CudaGraphStep, reused across epochs.
        loader: yields dicts with "image" (B, 1, H, W), "mask" (B, 1, H, W), "text" list[str].
        tokenize: captions → {"input_ids", "attention_mask"} (the unwrapped model's `tokenize`).
        augment_fn: `(image, mask, captions, generator) -> (image, mask, captions)` applied on
            `device` (tmc.augment.augment_training_batch with its mode bound), or None.
        caption_fn: `(captions, generator) -> captions` after the augmentation (rewording and
            caption dropout: datasets.captions.CaptionVariation), or None. The alignment's
            positive pairs are read before it: the same facts, however worded.
        guard: counts non-finite losses; a step with one is skipped on every rank.
        deadline: time.time() after which no further step starts (after at least one step); every
            rank stops at the same step.
        read_every: the host reads the running sums (progress bar, guard) every this many steps;
            the steps in between issue device work only.

    Returns:
        {"loss", "seg", "align"} image-weighted means over all ranks, "steps" (optimizer updates),
        "skipped" (non-finite steps), "images" (over all ranks).
    """
    dist = dist or Dist()
    step.model.train()
    total = len(loader) if not max_steps else min(max_steps, len(loader))
    sums = EpochSums(device, guard.in_a_row)
    iters = 0
    bar = tqdm(loader, total=total, desc=desc, leave=False, dynamic_ncols=True,
               disable=not (progress and dist.is_main))
    for batch in bar:
        if max_steps and iters >= max_steps:
            break
        if deadline is not None and iters > 0 and \
                all_reduce_sum([float(time.time() > deadline)], dist, device)[0] > 0:
            break
        image = batch["image"].to(device, non_blocking=True)  # (B, 1, H, W)
        mask = batch["mask"].to(device, non_blocking=True)  # (B, 1, H, W)
        captions = list(batch["text"])
        if augment_fn is not None:
            image, mask, captions = augment_fn(image, mask, captions, generator=aug_generator)
        positives = caption_positive_mask(captions, device=device)  # (B, B)
        if caption_fn is not None:
            captions = caption_fn(captions, generator=aug_generator)
        tokens = {k: v.to(device) for k, v in tokenize(captions).items()}  # (B, T) each
        sums.add(step({"image": image, "mask": mask, **tokens, "positives": positives}), image.shape[0])
        iters += 1
        if iters % read_every == 0 or iters == 1:
            v = sums.read(guard)
            if v.images:
                bar.set_postfix(loss=f"{v.loss / v.images:.4f}")
    bar.close()
    v = sums.read(guard)
    loss_sum, seg_sum, align_sum, n = all_reduce_sum([v.loss, v.seg, v.align, v.images], dist, device)
    skipped = int(v.skipped)
    mean = (lambda s: s / n) if n else (lambda s: float("nan"))
    # steps and skips are the same on every rank (the skip decision is shared)
    return {"loss": mean(loss_sum), "seg": mean(seg_sum), "align": mean(align_sum),
            "steps": iters - skipped, "skipped": skipped, "images": int(n)}


# ---------------------------------------------------------------------------- evaluation

@torch.no_grad()
def predict_records(model, loader, *, device: torch.device, tokenize, amp: str = "off",
                    max_batches: int = 0, dist: Dist | None = None, on_batch=None,
                    return_attention: bool = False, desc: str = "eval", progress: bool = True
                    ) -> list[dict]:
    """Threshold the model's probabilities at 0.5 and count tp/fp/fn per image.

    Args:
        loader: evaluation loader (under DDP with a `ShardSampler`).
        on_batch: optional callback(batch, out, prob (B, 1, H, W), pred (B, 1, H, W) bool), e.g.
            to draw overlays; `out` holds "attention" when `return_attention`.

    Returns:
        one dict per image (from every rank): key, case, slice, tp, fp, fn.
    """
    dist = dist or Dist()
    was_training = model.training
    model.eval()
    records = []
    total = len(loader) if not max_batches else min(max_batches, len(loader))
    bar = tqdm(loader, total=total, desc=desc, leave=False, dynamic_ncols=True,
               disable=not (progress and dist.is_main))
    for b, batch in enumerate(bar):
        if max_batches and b >= max_batches:
            break
        image = batch["image"].to(device, non_blocking=True)  # (B, 1, H, W)
        mask = batch["mask"].to(device, non_blocking=True) > 0.5  # (B, 1, H, W) bool
        tokens = {k: v.to(device) for k, v in tokenize(list(batch["text"])).items()}
        with autocast(device, amp):
            out = model(image, **tokens, return_attention=return_attention)
        prob = torch.sigmoid(out["logits"].float())  # (B, 1, H, W)
        pred = prob > THRESHOLD  # (B, 1, H, W)
        tp, fp, fn = (np.asarray(t).reshape(-1).tolist() for t in confusion(pred, mask))  # (B,)
        for i in range(image.shape[0]):
            records.append({"key": batch["key"][i], "case": batch["case"][i],
                            "slice": int(batch["slice"][i]), "tp": int(tp[i]), "fp": int(fp[i]),
                            "fn": int(fn[i])})
        if on_batch is not None:
            on_batch(batch, out, prob, pred)
    bar.close()
    model.train(was_training)
    records = gather_lists(records, dist)
    return sorted(records, key=lambda r: (r["case"], r["slice"], r["key"]))


def summarize(records: list[dict], empty: float = 1.0) -> dict:
    """Dice and IoU of a split under the three protocols of tmc.metrics.

    Args:
        records: per-image dicts with case, slice (-1 for 2D images), tp, fp, fn.
        empty: score of an empty-vs-empty image or slice (1.0, or NaN to leave such images out).

    Returns:
        dice/miou (the paper's protocol: per case for volumes, per image for 2D sets), protocol,
        dice_per_image, iou_per_image, dice_global, iou_global, dice_per_case, iou_per_case,
        n_images, n_cases, n_images_empty (empty-vs-empty), n_cases_unscored (NaN case score),
        empty_rule, cases {case: {dice, iou, n_slices}}.
    """
    if not records:
        raise ValueError("no images were evaluated; fix: check the split is not empty")
    counts = {k: np.array([r[k] for r in records], dtype=np.int64) for k in ("tp", "fp", "fn")}
    per_image = mean_scores(counts, empty_score=empty)
    per_case = per_case_scores(counts, [r["case"] for r in records], empty_score=empty)
    glob = global_scores(counts["tp"], counts["fp"], counts["fn"], empty=empty)
    volumetric = any(r["slice"] >= 0 for r in records)
    s = {
        "protocol": "per-case" if volumetric else "per-image",
        "empty_rule": "empty-vs-empty = "
                      + ("NaN (left out of means)" if math.isnan(empty) else f"{empty:g}"),
        "dice_per_image": per_image["dice"], "iou_per_image": per_image["iou"],
        "dice_global": glob["dice_global"], "iou_global": glob["iou_global"],
        "dice_per_case": per_case["mean_dice"], "iou_per_case": per_case["mean_iou"],
        "n_images": len(records), "n_cases": len(per_case["cases"]),
        "n_images_empty": int(((counts["tp"] + counts["fp"] + counts["fn"]) == 0).sum()),
        "n_cases_unscored": int(np.isnan(per_case["dice"]).sum()),
    }
    s["dice"] = s["dice_per_case"] if volumetric else s["dice_per_image"]
    s["miou"] = s["iou_per_case"] if volumetric else s["iou_per_image"]
    s["cases"] = {c: {"dice": float(d), "iou": float(i), "n_slices": int(n)} for c, d, i, n in
                  zip(per_case["cases"], per_case["dice"], per_case["iou"], per_case["n_slices"])}
    return s
