"""The held-out test rewriter (lab/report_captions.py) keeps apart from the training generator
and keeps every fact, read back by a reader written here for its words."""
import itertools
import random
import re

import numpy as np

from datasets.captions import vary_caption
from datasets.breast_caption import breast_caption
from datasets.text_from_mask import LEVELS, SIDES, caption_from_zones
from lab.report_captions import report_caption

# The words a report shares with the generator: the sides, the lung and the joins, and numbers.
SHARED = {"left", "right", "l", "r", "lung", "and", "bilateral"}
ZONE_TABLES = [np.array(b, dtype=bool).reshape(2, 3) for b in itertools.product((0, 1), repeat=6)]


def captions():
    for zones in ZONE_TABLES:
        for style in ("lvit", "sgseg"):
            yield caption_from_zones(zones, int(zones.sum()), style=style), zones


def words(texts) -> set[str]:
    return {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}


def read_report(text: str) -> frozenset:
    """The zones a report names: a slow, obvious reader of the report vocabulary."""
    t = text.lower()
    every = {(s, lv) for s in SIDES for lv in LEVELS}
    if re.search(r"unremarkable|normal lung", t):
        return frozenset()
    if re.search(r"(diffuse|widespread) bilateral", t):
        return frozenset(every)
    both = {"bibasal": "lower", "bibasilar": "lower", "biapical": "upper", "bilateral perihilar": "middle"}
    for phrase, level in both.items():
        if phrase in t:
            return frozenset((s, level) for s in SIDES)
    level_of = {"superior": "upper", "apex": "upper", "perihilar": "middle", "inferior": "lower", "base": "lower"}
    zones = set()
    for segment in re.split(r" and (?=(?:left|right|l|r|diffuse)\b)", t):
        side = "left" if re.search(r"\b(left|l)\b", segment) else "right" if re.search(r"\b(right|r)\b", segment) else None
        assert side is not None, text
        if "diffuse" in segment or "hemithorax" in segment:
            zones |= {(side, lv) for lv in LEVELS}
        zones |= {(side, level_of[w]) for w in re.findall(r"[a-z]+", segment) if w in level_of}
    return frozenset(zones)


def test_every_report_keeps_the_zones():
    for i, (caption, zones) in enumerate(captions()):
        for seed in range(8):
            text = report_caption(caption, seed, i)
            expect = {(SIDES[s], LEVELS[lv]) for s in range(2) for lv in range(3) if zones[s, lv]}
            assert read_report(text) == expect, (caption, text)


def test_the_report_words_are_not_the_generator_words():
    rng = random.Random(0)
    reports = [report_caption(c, seed, i) for i, (c, _) in enumerate(captions()) for seed in range(10)]
    training = [vary_caption(c, rng) for c, _ in captions() for _ in range(40)]
    shared = words(reports) & words(training)
    assert shared <= SHARED | {"x", "mm", "cm"}, sorted(shared - SHARED)
    assert len(words(reports) - SHARED) > 20  # a vocabulary of its own, not an empty table


def test_reports_are_fixed_by_seed_and_index_and_fit_when_asked():
    caption = "bilateral pulmonary infection, five infected areas, upper middle lower left lung and middle lower right lung."
    assert report_caption(caption, 0, 7) == report_caption(caption, 0, 7)
    assert len({report_caption(caption, 0, i) for i in range(30)}) > 5
    assert len(report_caption(caption, 0, 3)) > 85  # this draw is long
    assert len(report_caption(caption, 0, 3, fits=lambda t: len(t) <= 85)) <= 85  # redrawn to fit


def test_breast_and_unknown_captions():
    mask = np.zeros((64, 64), dtype=bool)
    mask[5:15, 50:60] = True  # the image's right half: the patient's left breast
    caption = breast_caption(mask, z_fraction=0.8)
    text = report_caption(caption, 0, 0)
    assert "left breast" in text and "upper" in text and "1.0 cm" in text, text
    assert report_caption("A lesion of my own.", 0, 0) == "A lesion of my own."
