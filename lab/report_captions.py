"""A second rewriter, for testing only: a caption's facts as a radiology report might state them.

Never used for training or model selection. It keeps apart from the training generator
(datasets/captions.py): its words for the finding ("airspace opacification", "ground-glass
change"), the levels ("superior", "perihilar", "inferior"; "apex", "base"; "bibasal",
"biapical"), the lung ("hemithorax", "lung field") and whole-lung phrases ("diffuse
bilateral") are none of the generator's, and so are its sentence shapes ("Findings: …",
"There is … affecting the …", "… noted."). Only the side words (left, right, L, R) and
"and" are shared: a report has no others. `tests/lab/test_report_captions.py` checks the
vocabularies stay apart and that the facts survive.

Each caption's rewording is fixed by (seed, caption index), so a robustness table can be rerun.
"""
from __future__ import annotations

import random

from datasets.captions import ChestFacts, breast_facts, chest_facts
from datasets.text_from_mask import number_word

__all__ = ["FINDINGS", "LEVEL_ADJECTIVES", "LEVEL_NOUNS", "report_caption", "report_chest", "report_breast"]

FINDINGS = ("airspace opacification", "ground-glass change", "patchy shadowing", "pneumonic change",
            "hazy airspace shadowing")
LEVEL_ADJECTIVES = {"upper": "superior", "middle": "perihilar", "lower": "inferior"}
LEVEL_NOUNS = {"upper": ("apex", "apices"), "lower": ("base", "bases")}  # no noun for the hilar level
BOTH_ONE_LEVEL = {"upper": ("biapical",), "middle": ("bilateral perihilar",),
                  "lower": ("bibasal", "bibasilar")}
WHOLE_SIDE = ("diffuse {side} hemithorax", "{side} hemithorax diffusely")
WHOLE_BOTH = ("diffuse bilateral", "widespread bilateral")


def _side_phrase(side: str, levels: tuple[str, ...], rng: random.Random) -> str:
    """One side in report words, without an article: "left base", "R apex and base", "left
    superior and perihilar lung", "diffuse right hemithorax"."""
    s = rng.choice((side, side, side[0].upper()))
    if len(levels) == 3:
        return rng.choice(WHOLE_SIDE).format(side=side)
    if all(lv in LEVEL_NOUNS for lv in levels) and rng.random() < 0.6:
        nouns = [LEVEL_NOUNS[lv][0] for lv in levels]
        return f"{s} " + " and ".join(nouns)
    words = [LEVEL_ADJECTIVES[lv] for lv in levels]
    joined = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return f"{s} {joined} lung"


def report_chest(facts: ChestFacts, rng: random.Random) -> str:
    """A chest caption's zones (and stated count) in report words."""
    finding = rng.choice(FINDINGS)
    if not facts.zones:
        return rng.choice(("Unremarkable chest radiograph.", "Normal lung parenchyma."))
    left, right = facts.levels("left"), facts.levels("right")
    if left and left == right and len(left) == 3:
        where = f"{rng.choice(WHOLE_BOTH)}"
        body = rng.choice((f"{where} {finding}", f"{finding}, {where}"))
    else:
        if left and left == right and len(left) == 1:
            where = rng.choice(BOTH_ONE_LEVEL[left[0]])
        else:
            sides = [s for s, lv in (("left", left), ("right", right)) if lv]
            if rng.random() < 0.5:
                sides.reverse()
            where = " and ".join(_side_phrase(s, facts.levels(s), rng)
                                                          for s in sides)
        body = rng.choice((f"Findings: {finding}, {where}", f"{where} {finding} noted",
                           f"Impression: {where} {finding}", f"{finding} within {where}"))
    n = facts.count if facts.count is not None else len(facts.zones)
    if n != len(facts.zones) or rng.random() < 0.3:  # a count the zones do not imply is kept
        body += f" ({n} foci)" if n > 1 else " (single focus)"
    return body[0].upper() + body[1:] + "."


def report_breast(caption: str, rng: random.Random) -> str | None:
    """A Duke slice caption in report words, or None when it is not one."""
    facts = breast_facts(caption)
    if facts is None:
        return None
    where = " and ".join(f"{side} breast at the {level} {radial} aspect" for side, level, radial in facts.quadrants)
    size = f"{facts.size_mm / 10:.1f} cm"
    noun = "enhancing focus" if facts.count == 1 else f"{number_word(facts.count)} enhancing foci"
    return rng.choice((f"Findings: {noun} in the {where}, measuring {size}.",
                       f"There is {'an' if facts.count == 1 else ''} {noun} within the {where} ({size}).".replace("  ", " ")))


def report_caption(caption: str, seed: int, index: int, fits=None) -> str:
    """The caption `index` of a test split, reworded with the seed `seed`; a caption of no known
    family is returned as it is (and counted by the caller). `fits(text) -> bool` (the model's
    token limit) redraws a rewording that would be cut; the shortest is kept if none fits."""
    rng = random.Random(seed * 1_000_003 + index)
    facts = chest_facts(caption)
    if facts is None and breast_facts(caption) is None:
        return caption
    drawn = []
    for _ in range(50):
        text = report_chest(facts, rng) if facts is not None else report_breast(caption, rng)
        if fits is None or fits(text):
            return text
        drawn.append(text)
    return min(drawn, key=len)
