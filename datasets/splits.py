"""Patient-level train/val/test splitting (paper §4.1: 7:1:2, stratified) and the leak check.

The unit of splitting is the case (patient, study or volume), never the image or slice: images of
one patient are correlated, and putting them on both sides of a split inflates test scores.

`assign_splits` is deterministic. Cases are sorted, then shuffled with numpy's PCG64 seeded by `seed`,
so the result depends only on the set of case ids, their strata, the ratios and the seed, and not on
file order. With strata, each stratum is split on its own. Its counts are the ideal shares rounded
down or up (never further off than one case per split). The leftover cases go to the splits the
strata before it short-changed most, so the totals also stay as close as possible to the ratios.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from datasets.records import DatasetError

__all__ = ["SPLITS", "normalise_split", "apportion", "assign_splits", "check_no_leak"]

SPLITS = ("train", "val", "test")
_ALIASES = {"train": "train", "training": "train", "tr": "train",
            "val": "val", "valid": "val", "validation": "val", "dev": "val",
            "test": "test", "testing": "test", "ts": "test"}


def normalise_split(name: str, where: str = "") -> str:
    """'Train', 'valid', 'Validation', 'TEST' ... → 'train' | 'val' | 'test'."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise DatasetError(f"{where or 'split'}: unknown split name {name!r}; expected one of "
                           f"train, val (valid, validation), test")
    return _ALIASES[key]


def apportion(n: int, ratios: Sequence[float], carry: Sequence[float] | None = None) -> list[int]:
    """Split n items into len(ratios) integer counts, each the floor or ceiling of n * ratio.

    Args:
        n: number of items.
        ratios: shares (normalised inside).
        carry: per-split shortfall so far (ideal − given); the leftover items go first to the
            largest fractional part + carry; ties to the split with fewer items (5 cases at
            7:1:2 → 3/1/1, not 4/0/1), then to the earlier split.

    Returns:
        counts summing to n.
    """
    r = np.asarray(ratios, dtype=np.float64)
    r = r / r.sum()
    ideal = n * r
    counts = np.floor(ideal + 1e-9).astype(int)
    priority = ideal - counts + (np.zeros_like(r) if carry is None else np.asarray(carry))
    order = sorted(range(len(r)), key=lambda i: (-round(priority[i], 9), counts[i], i))
    for i in order[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def assign_splits(cases: Iterable[str], strata: Iterable[str] | None = None,
                  ratios: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0) -> dict[str, str]:
    """Assign every case to "train" / "val" / "test", stratified, at case level.

    Args:
        cases: case ids, one per sample (repeats are fine: each case is assigned once).
        strata: one stratum label per entry of `cases` (same length), or None. A case whose samples
            carry different strata is placed by its most frequent one (ties: alphabetical first).
        ratios: (train, val, test) shares.
        seed: shuffling seed.

    Returns:
        {case: split}.
    """
    cases = [str(c) for c in cases]
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise ValueError(f"ratios must be three non-negative shares (train, val, test), got {ratios}")
    strata = [""] * len(cases) if strata is None else [str(s) for s in strata]
    if len(strata) != len(cases):
        raise ValueError(f"strata has {len(strata)} entries for {len(cases)} cases")
    votes: dict[str, Counter] = defaultdict(Counter)
    for case, stratum in zip(cases, strata):
        votes[case][stratum] += 1
    members: dict[str, list[str]] = defaultdict(list)
    for case in sorted(votes):
        stratum = min(votes[case].items(), key=lambda kv: (-kv[1], kv[0]))[0]
        members[stratum].append(case)

    rng = np.random.Generator(np.random.PCG64(seed))
    r = np.asarray(ratios, dtype=np.float64) / sum(ratios)
    shortfall = np.zeros(3)
    out: dict[str, str] = {}
    for stratum in sorted(members):
        group = members[stratum]
        counts = apportion(len(group), r, carry=shortfall)
        shortfall += len(group) * r - np.asarray(counts)
        order = rng.permutation(len(group))
        bounds = np.cumsum([0, *counts])
        for s, name in enumerate(SPLITS):
            for i in order[bounds[s]:bounds[s + 1]]:
                out[group[i]] = name
    return out


def check_no_leak(rows: Iterable[dict], where: str = "") -> None:
    """Raise DatasetError if a case appears in more than one split.

    Args:
        rows: dicts with at least "case" and "split" (e.g. the cache's index rows).
        where: the dataset or cache folder, for the message.
    """
    seen: dict[str, set] = defaultdict(set)
    for row in rows:
        seen[str(row["case"])].add(row["split"])
    leaks = {c: sorted(s) for c, s in seen.items() if len(s) > 1}
    if leaks:
        shown = "; ".join(f"{c}: {'/'.join(s)}" for c, s in sorted(leaks.items())[:5])
        raise DatasetError(f"{where or 'dataset'}: {len(leaks)} case(s) appear in more than one "
                           f"split ({shown}{'; ...' if len(leaks) > 5 else ''}); expected each "
                           f"patient/case in one split only; fix: use --split-mode paper or correct "
                           f"the layout's split lists")
