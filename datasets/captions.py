"""Caption variation for training: the same facts in other words, and captions left out.

Every caption family of the readers is templated: the QaTa/LViT chest template (QaTa-COV19,
MosMedData+, the demo, captions written from masks) and Duke's slice captions written from the mask.
A model trained on one template learns its words, not what they say, and fails on a report or on
no caption at all. `vary_caption` reads a caption's facts and states them again in words drawn
from the tables below (finding, zone and side words, the order of sides and zones, counts as
digits, words or left out, whole-lung phrases, abbreviations, case and punctuation); a caption of
no known family keeps its words and only changes case and final punctuation. `CaptionVariation`
applies it to training batches and replaces a share of the captions by "" (no caption), so the
model also learns to segment from the image alone.

The facts read back: `chest_facts`/`breast_facts` parse the templates, and the tests parse every
rewording with the same tables (`read_chest_facts`). Left and right are the caption's own words
(QaTa's are the image's sides); rewording never converts between conventions.
"""
from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass

import torch

from datasets.text_from_mask import LEVELS, SIDES, number_word

__all__ = ["ChestFacts", "chest_facts", "render_chest", "read_chest_facts",
           "BreastFacts", "breast_facts", "render_breast", "vary_caption", "CaptionVariation"]

_NUMBERS = {number_word(i): i for i in range(21)}


def _count(word: str) -> int | None:
    word = word.lower()
    return int(word) if word.isdigit() else _NUMBERS.get(word)


# ---------------------------------------------------------------------------- chest: facts

@dataclass(frozen=True)
class ChestFacts:
    """What a QaTa-style caption says: the zones (side, level) with infection, and the count it
    states (None when it states none)."""
    zones: frozenset  # {("left" | "right", "upper" | "middle" | "lower")}
    count: int | None = None

    def levels(self, side: str) -> tuple[str, ...]:
        return tuple(lv for lv in LEVELS if (side, lv) in self.zones)


_CHEST = re.compile(r"^\s*(bilateral|unilateral) pulmonary infection,\s*(\w+) infected areas?,\s*(.+?)\s*\.?\s*$",
                    re.IGNORECASE)
_SIDE_PART = re.compile(r"^(all|(?:(?:upper|middle|lower)\s*)+)\s+(left|right) lung$", re.IGNORECASE)


def chest_facts(caption: str) -> ChestFacts | None:
    """Facts of a caption in the QaTa/LViT template (either side order, "all left lung" too), or None."""
    if re.fullmatch(r"\s*no pulmonary infection\s*\.?\s*", caption, re.IGNORECASE):
        return ChestFacts(frozenset(), 0)
    m = _CHEST.match(caption)
    if not m or _count(m[2]) is None:
        return None
    zones = set()
    for part in re.split(r"\s+and\s+", m[3].strip()):
        p = _SIDE_PART.match(part.strip())
        if not p:
            return None
        side, words = p[2].lower(), p[1].lower().split()
        zones |= {(side, lv) for lv in (LEVELS if words == ["all"] else words)}
    return ChestFacts(frozenset(zones), _count(m[2]))


# ---------------------------------------------------------------------------- chest: words
# The training generator's vocabulary. The robustness protocol's reworded test captions come from a
# second rewriter with words and sentence shapes of its own (lab/report_captions.py).
FINDINGS = [("pulmonary infection", "pulmonary infection"), ("infection", "infection"),
            ("lung infection", "lung infection"), ("pneumonia", "pneumonia"),
            ("covid-19 pneumonia", "covid-19 pneumonia"), ("opacity", "opacities"),
            ("consolidation", "consolidation"), ("infiltrate", "infiltrates"), ("lesion", "lesions"),
            ("infected area", "infected areas"), ("abnormality", "abnormalities"), ("disease", "disease")]
LEVEL_WORDS = {"upper": ("upper", "top", "apical"), "middle": ("middle", "mid"),
               "lower": ("lower", "bottom", "basal")}
ZONE_NOUNS = ("zone", "region", "part")
SIDE_WORDS = {"left": ("left", "left", "lt", "l"), "right": ("right", "right", "rt", "r")}
WHOLE_SIDE = ("whole {side} lung", "entire {side} lung", "all {side} lung", "all of the {side} lung",
              "{side} lung throughout", "all {side} zones")
WHOLE_BOTH = ("both lungs entirely", "all zones of both lungs", "whole of both lungs",
              "throughout both lungs", "both lungs, all zones")
SIDE_SEPARATORS = (" and ", " and ", "; ", " as well as ", " plus ")
MAX_PIECES = 17  # words and marks: a rewording stays inside the model's T = 24 tokens


def _join(words: list[str], rng: random.Random) -> str:
    if len(words) == 1:
        return words[0]
    style = rng.randrange(4)
    if style == 0:
        return " ".join(words)  # the template's "upper middle"
    if style == 1:
        return "/".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def _side_phrase(side: str, levels: tuple[str, ...], rng: random.Random) -> str:
    """One side's zones, e.g. "left lower zone", "upper and lower right lung", "LLZ and LMZ"."""
    s = rng.choice(SIDE_WORDS[side])
    if len(levels) == 3 and rng.random() < 0.6:
        return rng.choice(WHOLE_SIDE).format(side=side if len(s) <= 2 else s)
    order = list(levels) if rng.random() < 0.8 else list(reversed(levels))
    words = [rng.choice(LEVEL_WORDS[lv]) for lv in order]
    noun = rng.choice(ZONE_NOUNS)
    plural = "s" if len(words) > 1 else ""
    shape = rng.randrange(5)
    if shape == 0:
        return f"{_join(words, rng)} {s} lung"
    if shape == 1:
        return f"{s} {_join(words, rng)} {noun}{plural}"
    if shape == 2:
        return f"{_join(words, rng)} {noun}{plural} of the {side} lung"
    if shape == 3:
        return f"{side} lung ({_join(words, rng)})"
    return " and ".join(f"{side[0]}{lv[0]}z".upper() for lv in order)  # LUZ, LMZ, LLZ


def _zones_phrase(facts: ChestFacts, rng: random.Random) -> str:
    left, right = facts.levels("left"), facts.levels("right")
    if left and right and left == right:
        if len(left) == 3 and rng.random() < 0.6:
            return rng.choice(WHOLE_BOTH)
        if rng.random() < 0.5:
            words = _join([rng.choice(LEVEL_WORDS[lv]) for lv in left], rng)
            noun = rng.choice(ZONE_NOUNS)
            return rng.choice((f"both {words} {noun}s", f"{words} {noun}s of both lungs",
                               f"{words} {noun}s bilaterally"))
    sides = [s for s, lv in (("left", left), ("right", right)) if lv]
    if rng.random() < 0.5:
        sides.reverse()
    return rng.choice(SIDE_SEPARATORS).join(_side_phrase(s, facts.levels(s), rng) for s in sides)


def render_chest(facts: ChestFacts, rng: random.Random) -> str:
    """The facts in a sentence drawn from the training vocabulary (lower case; see `vary_caption`)."""
    if not facts.zones:
        return rng.choice(("no pulmonary infection", "no infection", "no opacity", "clear lungs",
                           "no lesion"))
    n_zones = len(facts.zones)
    n = facts.count if facts.count is not None else n_zones
    sing, plural = rng.choice(FINDINGS)
    finding = sing if n == 1 else plural
    bilateral = bool(facts.levels("left")) and bool(facts.levels("right"))
    lat = rng.choice(("bilateral", "bilat", "both-sided")) if bilateral else \
        rng.choice(("unilateral", "one-sided"))
    # the count may go unsaid only where the zones imply it (one area per zone)
    r = rng.random()
    count = "" if (n == n_zones and r < 0.4) else (str(n) if r < 0.7 else number_word(n))
    where = _zones_phrase(facts, rng)
    shape = rng.randrange(6)
    if shape == 0 or not count:
        shapes = [f"{finding} in the {where}", f"{where}: {finding}", f"{lat} {finding}, {where}",
                  f"{finding} involving the {where}", f"{where} {finding}"]
        text = rng.choice(shapes)
        if count:
            text += f", {count} area{'' if n == 1 else 's'}"
    elif shape == 1:
        text = f"{lat} {finding}, {count} {'area' if n == 1 else 'areas'}, {where}"
    elif shape == 2:
        text = f"{count} {finding} in the {where}"
    elif shape == 3:
        text = f"{finding} ({count}) at {where}"
    elif shape == 4:
        text = f"{where}: {count} {finding}"
    else:
        text = f"{lat} {finding} x{n}, {where}" if count.isdigit() else f"{count} {lat} {finding}, {where}"
    return text


def read_chest_facts(text: str) -> ChestFacts:
    """The zones a caption of `render_chest` names, read back with the generator's tables (used by
    the tests: every fact of the original must survive the rewording)."""
    t = text.lower()
    if re.search(r"\bno (pulmonary infection|infection|opacity|lesion)\b|clear lungs", t):
        return ChestFacts(frozenset(), 0)
    level_of = {w: lv for lv, ws in LEVEL_WORDS.items() for w in ws}
    zones = set()
    for abbr in re.findall(r"\b([lr])([uml])z\b", t):
        side = "left" if abbr[0] == "l" else "right"
        zones.add((side, {"u": "upper", "m": "middle", "l": "lower"}[abbr[1]]))
    if any(w in t for w in WHOLE_BOTH):
        return ChestFacts(frozenset((s, lv) for s in SIDES for lv in LEVELS), None)
    both = re.search(r"both ([a-z/ ,]+?) (?:zone|region|part)s|([a-z/ ,]+?) (?:zone|region|part)s "
                     r"(?:of both lungs|bilaterally)", t)
    if both:
        words = re.findall(r"[a-z]+", both[1] or both[2])
        return ChestFacts(frozenset((s, level_of[w]) for s in SIDES for w in words if w in level_of), None)
    # One segment per side: a side's phrase ends with its noun ("lung", "zones", "LLZ", ")"), so
    # an "and" right after such a word starts the next side; ";", "plus", "as well as" always do.
    ends = r"(?:lung|zones?|regions?|parts?|[lr][uml]z|\)|throughout)"
    segments = re.split(r";| plus | as well as ", re.sub(rf"\b({ends}) and ", r"\1; ", t))
    side_re = {"left": r"\b(left|lt|l)\b", "right": r"\b(right|rt|r)\b"}
    for seg in segments:
        sides = [s for s in SIDES if re.search(side_re[s], seg)]
        if len(sides) != 1:
            continue
        side = sides[0]
        if re.search(r"\b(whole|entire|all|throughout)\b", seg):
            zones |= {(side, lv) for lv in LEVELS}
            continue
        zones |= {(side, level_of[w]) for w in re.findall(r"[a-z]+", seg) if w in level_of}
    return ChestFacts(frozenset(zones), None)


# ---------------------------------------------------------------------------- breast (Duke)

@dataclass(frozen=True)
class BreastFacts:
    """What a Duke slice caption says: per breast side its quadrant, the lesion count and the
    largest size in mm."""
    quadrants: tuple  # ((side, "upper"|"lower", "inner"|"outer"), ...)
    count: int
    size_mm: int


_BREAST = re.compile(r"^(?:bilateral breast lesions|(left|right) breast lesions?), (\w+) lesions?, (.+?), "
                     r"(?:largest )?(\d+) mm\.?$", re.IGNORECASE)
_QUADRANT = re.compile(r"^(upper|lower) (outer|inner) quadrant of the (left|right) breast$", re.IGNORECASE)


def breast_facts(caption: str) -> BreastFacts | None:
    """Facts of a `datasets.breast_caption.breast_caption` caption, or None."""
    m = _BREAST.match(caption.strip())
    if not m or _count(m[2]) is None:
        return None
    quads = []
    for part in m[3].split(" and "):
        q = _QUADRANT.match(part.strip())
        if not q:
            return None
        quads.append((q[3].lower(), q[1].lower(), q[2].lower()))
    return BreastFacts(tuple(quads), _count(m[2]), int(m[4]))


def render_breast(facts: BreastFacts, rng: random.Random) -> str:
    """The facts in other words: "lt breast UOQ mass, 14 mm", "2 lesions, upper-outer left breast…"."""
    sing, plural = rng.choice((("lesion", "lesions"), ("tumour", "tumours"), ("tumor", "tumors"),
                               ("mass", "masses"), ("enhancing lesion", "enhancing lesions")))
    finding = sing if facts.count == 1 else plural
    parts = []
    for side, level, radial in facts.quadrants:
        s = rng.choice(SIDE_WORDS[side][:3])
        shape = rng.randrange(3)
        if shape == 0:
            parts.append(f"{level}-{radial} quadrant of the {side} breast")
        elif shape == 1:
            parts.append(f"{s} breast {(level[0] + radial[0]).upper()}Q")  # e.g. "lt breast UOQ"
        else:
            parts.append(f"{s} breast, {level} {radial}")
    if rng.random() < 0.5:
        parts.reverse()
    where = " and ".join(parts)
    size = f"{facts.size_mm} mm" if rng.random() < 0.6 else f"{facts.size_mm / 10:.1f} cm"
    n = str(facts.count) if rng.random() < 0.5 else number_word(facts.count)
    shape = rng.randrange(3)
    if shape == 0:
        return f"{finding} in the {where}, {n} {finding if facts.count != 1 else sing}, {size}"
    if shape == 1:
        return f"{where}: {n} {finding}, largest {size}" if facts.count > 1 else f"{where}: {finding}, {size}"
    return f"{n} {finding} ({size}), {where}"


# ---------------------------------------------------------------------------- any caption

def _surface(text: str, rng: random.Random) -> str:
    """Case and final punctuation, as people type them."""
    r = rng.random()
    if r < 0.55:
        text = text.lower()
    elif r < 0.9:
        text = text[:1].upper() + text[1:]
    else:
        text = text.upper()
    return text.rstrip(" .") + rng.choice((".", ".", "", " ."))


def vary_caption(caption: str, rng: random.Random) -> str:
    """The caption's facts in other words (module docstring); unknown forms change case and final
    punctuation only; "" stays ""."""
    if not caption.strip():
        return caption
    chest, breast = chest_facts(caption), breast_facts(caption)
    if chest is None and breast is None:
        return _surface(caption, rng)
    for _ in range(20):  # redraw a rewording too long for the model's tokens
        text = render_chest(chest, rng) if chest is not None else render_breast(breast, rng)
        if len(re.findall(r"\w+|[^\w\s]", text)) <= MAX_PIECES:
            return _surface(text, rng)
    return _surface(caption, rng)


class CaptionVariation:
    """Training captions: a share `dropout` replaced by "" (no caption), a share `keep` of the rest
    left as the dataset wrote them, and the others reworded into one of `pool` fixed variants.

    Keeping some captions literal holds the dataset's own wording among the ones the model knows
    best, as a user of that dataset will type it.

    Variant k of a caption is `vary_caption(caption, Random(crc32(caption) + k))`: the same on every
    run and machine. Which variant, and which captions are dropped, is drawn from the augmentation's
    torch.Generator, so a seeded run is reproducible.
    """

    def __init__(self, pool: int = 24, dropout: float = 0.2, keep: float = 0.25) -> None:
        if pool < 1 or not (0.0 <= dropout <= 1.0 and 0.0 <= keep <= 1.0):
            raise ValueError(f"pool must be >= 1, dropout and keep in [0, 1]; got {pool}, {dropout}, {keep}")
        self.pool, self.dropout, self.keep = pool, dropout, keep
        self._variants: dict[tuple[str, int], str] = {}

    def variant(self, caption: str, k: int) -> str:
        key = (caption, k)
        if key not in self._variants:
            self._variants[key] = vary_caption(caption, random.Random(zlib.crc32(caption.encode()) + k))
        return self._variants[key]

    def __call__(self, captions: list[str], generator=None) -> list[str]:
        n = len(captions)
        device = generator.device if generator is not None else "cpu"
        k = torch.randint(0, self.pool, (n,), generator=generator, device=device).tolist()
        u = torch.rand(n, generator=generator, device=device).tolist()
        drop, keep = self.dropout, self.dropout + (1.0 - self.dropout) * self.keep
        return ["" if x < drop else c if x < keep else self.variant(c, j)
                for c, j, x in zip(captions, k, u)]
