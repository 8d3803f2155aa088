"""The grounding probe: its batches say what the captions say, and its training loop runs."""
import numpy as np
import pytest
import torch

from datasets.text_from_mask import caption_from_zones
from lab.grounding_probe import GRID, _LEVEL_ROWS, run_probe, zone_batch


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


class _NamesEverything(torch.nn.Module):
    """A probe that calls every token named: its Dice is known in closed form."""

    def __init__(self, text_model):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, captions, lesions, generator):
        return torch.ones_like(lesions) + 0 * self.w  # (B, G, G) logits, all positive


@pytest.mark.parametrize("lesion", [1, None])
def test_run_probe_scores_lesion_tokens_only_on_its_held_out_set(monkeypatch, lesion):
    """Dice of a probe naming every token, recomputed here from the held-out batch run_probe draws
    (seed 10_000 + seed): 2|T| / (|L| + |T|) over lesion tokens L (every token when dense). Scoring
    all tokens, or another set, gives another number."""
    from lab import grounding_probe

    monkeypatch.setattr(grounding_probe, "GroundingProbe", _NamesEverything)
    out = run_probe(lesion, steps=2, seed=3, eval_every=2, eval_size=32)
    _, target, lesions = zone_batch(np.random.default_rng(10_003), 32, lesion)
    t, n = float(target.sum()), float(lesions.sum())
    assert out["curve"][-1]["dice"] == pytest.approx(2 * t / (n + t))
    if lesion is not None:  # lesions are a strict subset of the grid, so scoring every token differs
        assert n < lesions.numel() and 2 * t / (lesions.numel() + t) < out["curve"][-1]["dice"] - 0.05
