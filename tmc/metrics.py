"""Binary segmentation metrics as pure NumPy functions (paper §4.3; nnU-Net conventions).

Everything comes from per-image confusion counts (tp, fp, fn), with no smoothing constant:
    dice = 2 tp / (2 tp + fp + fn),   iou = tp / (tp + fp + fn).

Empty-vs-empty rule (empty target and empty prediction, 0/0), set by `empty` / `empty_score`:
* 1.0 (default of `mean_scores`, `per_case_scores`): a correct "nothing here" is a perfect slice. It
  is the only rule under which normal scans (every slice empty) enter §4.3's mean over the slices of
  a case, then over *all* test cases, and its paired t-test on per-case Dice.
* NaN (nnU-Net; default of `dice_from_counts`, `iou_from_counts`, `per_image_scores`,
  `global_scores`): excluded from means; a case with no scorable slice gets NaN and is left out.
* 0.0 reproduces LViT's per-image protocol (it adds 1e-5 to the denominator).
An empty target with a non-empty prediction, or the reverse, is always 0.

Protocols (report which one a number uses):
* per-image mean (LViT family, QaTa): `per_case_scores(scores, keys)` with one case per image, or
  `mean_scores(scores)`;
* global / micro (GuideDecoder family): `global_scores(tp.sum(), fp.sum(), fn.sum())`;
* per-case (paper, volumes): `per_case_scores(scores, cases)`.

Shape key: N images (slices), H, W spatial.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = [
    "binarize",
    "confusion",
    "dice_from_counts",
    "iou_from_counts",
    "per_image_scores",
    "global_scores",
    "mean_scores",
    "per_case_scores",
    "mean_std",
    "METRIC_KEYS",
    "combine_runs",
    "paired_test",
]

THRESHOLD = 0.5


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_binary(x, name: str) -> np.ndarray:
    x = _to_numpy(x)
    if x.dtype == np.bool_:
        return x
    if not np.isin(x, (0, 1)).all():
        raise ValueError(f"{name} holds values other than 0/1 (dtype {x.dtype}); fix: threshold "
                         f"probabilities first with binarize(prob)")
    return x.astype(bool)


def _nanmean(x: np.ndarray) -> float:
    """Mean ignoring NaN; NaN (without a warning) when nothing is left."""
    x = np.asarray(x, dtype=np.float64)
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else math.nan


def _grouped_nanmean(x: np.ndarray, slot: np.ndarray, n: int) -> np.ndarray:
    """Mean of x within each group 0..n-1 ignoring NaN; NaN for a group with nothing left."""
    ok = ~np.isnan(x)
    sums = np.bincount(slot[ok], weights=x[ok], minlength=n)  # (n,)
    counts = np.bincount(slot[ok], minlength=n)  # (n,)
    return np.where(counts > 0, sums / np.maximum(counts, 1), math.nan)


def binarize(prob, threshold: float = THRESHOLD) -> np.ndarray:
    """Probabilities → bool mask: `prob > threshold` (0.5 ⇔ logit > 0; exactly 0.5 is background)."""
    return _to_numpy(prob) > threshold


def confusion(pred, target) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image confusion counts of binary masks.

    Args:
        pred: (..., H, W) bool (or 0/1) thresholded prediction.
        target: (..., H, W) bool (or 0/1) ground truth, same shape.

    Returns:
        tp, fp, fn: int64 arrays of shape (...) (0-d for a single (H, W) image).
    """
    p, t = _as_binary(pred, "pred"), _as_binary(target, "target")
    if p.shape != t.shape or p.ndim < 2:
        raise ValueError(f"pred {p.shape} and target {t.shape} must share one (..., H, W) shape")
    axes = (-2, -1)
    tp = np.sum(p & t, axis=axes, dtype=np.int64)
    fp = np.sum(p & ~t, axis=axes, dtype=np.int64)
    fn = np.sum(~p & t, axis=axes, dtype=np.int64)
    return tp, fp, fn


def dice_from_counts(tp, fp, fn, empty: float = math.nan) -> np.ndarray:
    """Dice = 2tp / (2tp + fp + fn); `empty` where tp = fp = fn = 0 (empty target and prediction)."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), empty)


def iou_from_counts(tp, fp, fn, empty: float = math.nan) -> np.ndarray:
    """IoU = tp / (tp + fp + fn); `empty` where tp = fp = fn = 0."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    denom = tp + fp + fn
    return np.where(denom > 0, tp / np.maximum(denom, 1), empty)


def per_image_scores(pred, target, empty: float = math.nan) -> dict[str, np.ndarray]:
    """Dice, IoU and counts of each image.

    Args:
        pred: (N, H, W) bool thresholded predictions.
        target: (N, H, W) bool ground truth.
        empty: score of an empty-vs-empty image (default NaN, nnU-Net).

    Returns:
        {"dice", "iou": (N,) float64, "tp", "fp", "fn": (N,) int64}. Keep the counts: the other
        protocols are computed from them.
    """
    tp, fp, fn = confusion(pred, target)
    if tp.ndim != 1:
        raise ValueError(f"per_image_scores expects (N, H, W) masks, got {tp.ndim + 2} dims")
    return {"dice": dice_from_counts(tp, fp, fn, empty), "iou": iou_from_counts(tp, fp, fn, empty),
            "tp": tp, "fp": fp, "fn": fn}


def global_scores(tp, fp, fn, empty: float = math.nan) -> dict[str, float]:
    """Global (micro) Dice and IoU: counts summed over the whole set first (GuideDecoder protocol).

    Args:
        tp, fp, fn: per-image counts (any shape) or their sums.
        empty: value when the whole set has no positive pixel in target and prediction.

    Returns:
        {"dice_global": float, "iou_global": float}.
    """
    t, p, n = (int(np.sum(a)) for a in (tp, fp, fn))
    return {"dice_global": float(dice_from_counts(t, p, n, empty)),
            "iou_global": float(iou_from_counts(t, p, n, empty))}


def mean_scores(scores: dict[str, np.ndarray], empty_score: float = 1.0) -> dict[str, float]:
    """Per-image mean Dice and IoU, re-scored from the counts with `empty_score` (NaN = excluded).

    Returns:
        {"dice": float, "iou": float, "n": number of images that entered the mean}.
    """
    dice = dice_from_counts(scores["tp"], scores["fp"], scores["fn"], empty_score)
    iou = iou_from_counts(scores["tp"], scores["fp"], scores["fn"], empty_score)
    return {"dice": _nanmean(dice), "iou": _nanmean(iou), "n": int((~np.isnan(dice)).sum())}


def per_case_scores(scores: dict[str, np.ndarray], cases: Sequence, empty_score: float = 1.0
                    ) -> dict:
    """The paper's volume protocol (§4.3): mean over the slices of each case, then over cases.

    Slice scores are recomputed from the counts with `empty_score`, whatever built `scores`.

    Args:
        scores: output of `per_image_scores` (uses "tp", "fp", "fn", each (N,)).
        cases: (N,) case id of each slice (any hashable: str, int).
        empty_score: score of an empty-vs-empty slice (NaN = excluded, nnU-Net).
    Returns:
        {"cases": list of case ids in first-seen order, "dice", "iou": (n_cases,) float64 per-case
        means (NaN for a case without any scorable slice), "n_slices": (n_cases,) int64,
        "mean_dice", "mean_iou": float means over the cases that have a score}. The per-case Dice
        array is what the paired t-test compares.
    """
    tp = np.asarray(scores["tp"])
    cases = list(cases)
    if len(cases) != tp.shape[0]:
        raise ValueError(f"{len(cases)} case ids for {tp.shape[0]} slices")
    dice = dice_from_counts(scores["tp"], scores["fp"], scores["fn"], empty_score)  # (N,)
    iou = iou_from_counts(scores["tp"], scores["fp"], scores["fn"], empty_score)  # (N,)
    order = list(dict.fromkeys(cases))
    index = {c: k for k, c in enumerate(order)}
    slot = np.array([index[c] for c in cases], dtype=np.int64)  # (N,) case slot of each slice
    case_dice = _grouped_nanmean(dice, slot, len(order))  # (n_cases,)
    case_iou = _grouped_nanmean(iou, slot, len(order))  # (n_cases,)
    return {"cases": order, "dice": case_dice, "iou": case_iou,
            "n_slices": np.bincount(slot, minlength=len(order)).astype(np.int64),
            "mean_dice": _nanmean(case_dice), "mean_iou": _nanmean(case_iou)}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; 0 for a single run) of a score over runs (seeds)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


# ---------------------------------------------------------------------------- over runs

METRIC_KEYS = ("dice", "miou", "dice_global", "iou_global", "dice_per_image", "iou_per_image",
               "dice_per_case", "iou_per_case")


def combine_runs(summaries: list[dict]) -> dict:
    """Mean ± std of every metric over runs (seeds); per-case scores averaged over the runs."""
    out = {"n_runs": len(summaries), "checkpoints": [s["checkpoint"] for s in summaries],
           "runs": [{k: v for k, v in s.items() if k != "cases"} for s in summaries]}
    for k in METRIC_KEYS:
        out[k], out[k + "_std"] = mean_std([s[k] for s in summaries])
    first = summaries[0]
    for k in ("protocol", "empty_rule", "n_images", "n_cases", "n_folder", "dataset", "split",
              "split_mode"):
        out[k] = first.get(k)
    out["checkpoint"] = first["checkpoint"] if len(summaries) == 1 else out["checkpoints"]
    cases = list(first["cases"])
    out["cases"] = {c: {"dice": float(np.nanmean([s["cases"][c]["dice"] for s in summaries])),
                        "iou": float(np.nanmean([s["cases"][c]["iou"] for s in summaries])),
                        "n_slices": first["cases"][c]["n_slices"],
                        "dice_runs": [s["cases"][c]["dice"] for s in summaries]}
                    for c in cases}
    return out


def paired_test(a: dict, b: dict) -> dict:
    """Paired t-test on per-case Dice (each case already averaged over its set's runs)."""
    from scipy.stats import ttest_rel  # deferred: scipy takes seconds to import, only --compare needs it

    cases = [c for c in a["cases"] if c in b["cases"]
             and math.isfinite(a["cases"][c]["dice"]) and math.isfinite(b["cases"][c]["dice"])]
    if len(cases) < 2:
        raise ValueError("fewer than 2 cases scored by both sets; a paired t-test needs more")
    x = np.array([a["cases"][c]["dice"] for c in cases])
    y = np.array([b["cases"][c]["dice"] for c in cases])
    res = ttest_rel(x, y)
    return {"n_cases": len(cases), "mean_diff": float((x - y).mean()), "t": float(res.statistic),
            "p": float(res.pvalue), "test": "scipy.stats.ttest_rel on per-case Dice (A vs B)"}
