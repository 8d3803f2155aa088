"""The zone read-out of lab.caption_probe: labels from a caption's facts, scores against a slow
count, a read-out that recovers linearly placed zones, and the rewordings' labels kept with them."""
import torch

from datasets.captions import chest_facts, read_chest_facts
from lab.caption_probe import ZONES, fit_probe, majority_scores, probe_sets, zone_labels, zone_scores

CAPTION = "Bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."


def test_zone_labels_name_the_caption_s_zones():
    y = zone_labels([CAPTION, "Unilateral pulmonary infection, one infected area, upper middle right lung."])
    want = [[float(z in {("left", "lower"), ("right", "lower")}) for z in ZONES],
            [float(z in {("right", "upper"), ("right", "middle")}) for z in ZONES]]
    assert y.tolist() == want


def test_zone_scores_match_a_slow_count():
    gen = torch.Generator().manual_seed(0)
    logits, y = torch.randn(40, 6, generator=gen), (torch.rand(40, 6, generator=gen) > 0.5).float()
    rows = [[(logits[i, j].item() > 0) == bool(y[i, j].item()) for j in range(6)] for i in range(40)]
    s = zone_scores(logits, y)
    assert abs(s["zone_accuracy"] - sum(map(sum, rows)) / 240) < 1e-6
    assert abs(s["exact"] - sum(all(r) for r in rows) / 40) < 1e-6
    m = majority_scores(torch.tensor([[1., 0, 0, 1, 1, 0]] * 3 + [[0., 0, 0, 0, 0, 0]]), y)
    assert abs(m["zone_accuracy"] - (y == torch.tensor([1., 0, 0, 1, 1, 0])).float().mean().item()) < 1e-6


def test_the_read_out_recovers_zones_placed_linearly_and_not_noise():
    gen = torch.Generator().manual_seed(1)
    y = (torch.rand(400, 6, generator=gen) > 0.6).float()
    mixing = torch.randn(6, 32, generator=gen)
    x = y @ mixing + 0.05 * torch.randn(400, 32, generator=gen) + 3.0  # offset: the folded scaling
    head = fit_probe(x[:300], y[:300])
    assert zone_scores(head(x[300:]), y[300:])["exact"] > 0.95
    noise = torch.randn(400, 32, generator=gen)
    assert zone_scores(fit_probe(noise[:300], y[:300])(noise[300:]), y[300:])["exact"] < 0.3


def test_every_training_text_keeps_the_facts_of_its_caption():
    other = "Unilateral pulmonary infection, one infected area, middle left lung."
    sources, tests = probe_sets([CAPTION, other], [other, CAPTION], fits=lambda t: True, rewordings=6)
    assert set(sources.values()) == {CAPTION, other} and len(sources) > 6
    assert sources[CAPTION] == CAPTION and any(t != s for t, s in sources.items())
    assert all(read_chest_facts(t).zones == chest_facts(s).zones for t, s in sources.items())
    assert tests["template"] == [other, CAPTION] and len(tests["reworded"]) == 2
    assert tests["reworded"] != tests["template"]
