"""Training captions reworded (datasets/captions.py): every fact survives, the variants fit the
model's tokens, and CaptionVariation's pool and dropout are what they say."""
import itertools
import random
import re

import numpy as np
import pytest
import torch

from tmc.augment import swap_caption_sides
from datasets.captions import (CaptionVariation, breast_facts, chest_facts, read_chest_facts,
                               vary_caption)
from datasets.breast_caption import breast_caption
from datasets.text_from_mask import LEVELS, SIDES, caption_from_zones, number_word

ALL_ZONES = [np.array(bits, dtype=bool).reshape(2, 3) for bits in itertools.product((0, 1), repeat=6)]


def zone_set(zones: np.ndarray) -> frozenset:
    return frozenset((SIDES[s], LEVELS[lv]) for s in range(2) for lv in range(3) if zones[s, lv])


def template_captions():
    """Every zone table in both template styles, with a lesion count the zones do not imply."""
    for zones in ALL_ZONES:
        for style in ("lvit", "sgseg"):
            count = int(zones.sum()) + 1 if zones.any() else 0
            yield caption_from_zones(zones, count, style=style), zone_set(zones), count, style


def test_the_templates_parse_to_their_zones_and_count():
    for caption, zones, count, style in template_captions():
        facts = chest_facts(caption)
        assert facts.zones == zones, caption
        assert facts.count == (len(zones) if style == "sgseg" else count), caption


def test_flipped_captions_parse_with_their_sides_swapped():
    caption = "bilateral pulmonary infection, three infected areas, upper lower left lung and lower right lung."
    flipped = swap_caption_sides(caption, True, True)  # "... lower upper right lung and upper left lung."
    assert chest_facts(flipped).zones == {("right", "lower"), ("right", "upper"), ("left", "upper")}


@pytest.mark.parametrize("seed", range(3))
def test_every_rewording_keeps_the_zones_and_a_count_the_zones_do_not_imply(seed):
    rng = random.Random(seed)
    for caption, zones, count, style in template_captions():
        for _ in range(12):
            text = vary_caption(caption, rng)
            assert text != caption or not zones
            assert read_chest_facts(text).zones == zones, (caption, text)
            if zones and style == "lvit":  # count = zones + 1 here: it must be said
                words = re.findall(r"\w+", text.lower())
                assert str(count) in words or number_word(count) in words or f"x{count}" in words, text


def test_the_rewordings_use_other_words_and_fit_the_model_tokens():
    from tmc.text import bert_uncased_tokenizer

    tokenizer = bert_uncased_tokenizer()
    rng = random.Random(0)
    caption = "bilateral pulmonary infection, six infected areas, upper middle lower left lung and upper middle lower right lung."
    texts = [vary_caption(caption, rng) for _ in range(300)]
    assert len(set(texts)) > 250  # many wordings, not a handful
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    assert max(lengths) <= 24
    vocabulary = {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}
    assert {"opacities", "consolidation", "basal", "apical", "llz", "bilat", "whole"} <= vocabulary


def breast_mask(cells: list[tuple[int, int, int, int]]) -> np.ndarray:
    mask = np.zeros((64, 64), dtype=bool)
    for r0, r1, c0, c1 in cells:
        mask[r0:r1, c0:c1] = True
    return mask


@pytest.mark.parametrize("cells", [[(5, 15, 2, 10)], [(30, 40, 20, 28), (30, 40, 40, 50)],
                                   [(5, 10, 50, 60), (20, 30, 52, 62)]])
def test_breast_captions_keep_side_quadrant_count_and_size(cells):
    caption = breast_caption(breast_mask(cells), z_fraction=0.7)
    facts = breast_facts(caption)
    assert facts is not None, caption
    rng = random.Random(1)
    for _ in range(30):
        text = vary_caption(caption, rng).lower()
        assert text != caption.lower()
        for side, level, radial in facts.quadrants:
            assert re.search(rf"\b({side}|{side[0]}t)\b", text), text
            assert f"{level[0]}{radial[0]}q" in text or (level in text and radial in text), text
        assert f"{facts.size_mm} mm" in text or f"{facts.size_mm / 10:.1f} cm" in text, text
        assert str(facts.count) in text or number_word(facts.count) in text, text


def test_unknown_captions_keep_their_words_and_blank_stays_blank():
    rng = random.Random(0)
    for _ in range(20):
        text = vary_caption("Tumour near the Nipple, 2 cm.", rng)
        assert re.findall(r"[a-z0-9]+", text.lower()) == ["tumour", "near", "the", "nipple", "2", "cm"]
    assert vary_caption("", rng) == ""


def test_variation_draws_a_fixed_pool_and_drops_and_keeps_the_shares_asked():
    caption = "unilateral pulmonary infection, one infected area, lower left lung."
    variation = CaptionVariation(pool=5, dropout=0.25, keep=0.4)
    out = variation([caption] * 4000, generator=torch.Generator().manual_seed(0))
    assert abs(out.count("") / 4000 - 0.25) < 0.03
    assert abs(out.count(caption) / 4000 - 0.75 * 0.4) < 0.03  # vary_caption itself never returns it
    assert 1 < len(set(out) - {"", caption}) <= 5  # at most `pool` wordings: a frozen encoder's cache stays small
    again = variation([caption] * 4000, generator=torch.Generator().manual_seed(0))
    assert again == out  # the augmentation's generator decides: a seeded run repeats
    fresh = CaptionVariation(pool=5, dropout=0.25)  # variant k is the same in another process
    assert [fresh.variant(caption, k) for k in range(5)] == [variation.variant(caption, k) for k in range(5)]
    assert all(read_chest_facts(t).zones == {("left", "lower")} for t in set(out) - {""})


def test_no_dropout_and_bad_settings():
    caption = "unilateral pulmonary infection, one infected area, lower left lung."
    assert "" not in CaptionVariation(dropout=0.0)([caption] * 500, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="dropout"):
        CaptionVariation(dropout=1.5)
