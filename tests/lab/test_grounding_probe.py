"""The grounding probe: its batches say what the captions say, and its training loop runs."""
import numpy as np
import pytest

from datasets.text_from_mask import caption_from_zones
from tmc.lab.grounding_probe import GRID, _LEVEL_ROWS, run_probe, zone_batch


def _zone_of(row: int, col: int) -> tuple[int, int]:
    """(side, level) of a lesion token; side 0 = image left."""
    level = next(i for i, rows in enumerate(_LEVEL_ROWS) if row in rows)
    return (0 if col < GRID // 2 else 1), level


@pytest.mark.parametrize("lesion", [1, 2])
def test_lesion_batches_target_exactly_the_named_zones(lesion):
    captions, target, lesions = zone_batch(np.random.default_rng(0), 64, lesion)
    for caption, t, here in zip(captions, target.numpy(), lesions.numpy()):
        assert (t <= here).all()  # every target token is a lesion token
        named = np.zeros((2, 3), bool)
        for r, c in zip(*np.nonzero(t)):
            side, level = _zone_of(r, c)
            named[side, level] = True
        # The caption is the template's sentence for exactly the zones whose lesions are targets.
        assert caption == caption_from_zones(named, int(named.sum()))
        for r, c in zip(*np.nonzero(here)):  # lesions never straddle a zone border row
            _zone_of(r, c)
        assert here.sum() == lesion * lesion * len({_zone_of(r, c) for r, c in zip(*np.nonzero(here))})


def test_dense_batches_label_whole_zones_and_every_token_counts():
    captions, target, lesions = zone_batch(np.random.default_rng(1), 16, None)
    assert lesions.eq(1).all()
    assert target.sum(dim=(1, 2)).remainder(len(_LEVEL_ROWS[0]) * GRID // 2).eq(0).all()


def test_run_probe_returns_a_dice_curve():
    out = run_probe(1, steps=4, eval_every=2, eval_size=8)
    assert [c["step"] for c in out["curve"]] == [2, 4]
    assert all(0.0 <= c["dice"] <= 1.0 and np.isfinite(c["train_loss"]) for c in out["curve"])
