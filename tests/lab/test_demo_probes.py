"""lab/demo_probes.py and the zone-probe command: what a model reads from the demo's zone captions."""
import re

import numpy as np
import torch


class _ZoneStub:
    """Segments the zone its one-zone caption names (or, level-blind, that caption's whole side)."""

    def __init__(self, size: int, level_blind: bool = False):
        self.size, self.level_blind = size, level_blind

    def tokenize(self, captions):
        return {"captions": captions}

    def __call__(self, image, captions):
        s = self.size
        logits = -torch.ones(len(captions), 1, s, s)
        for i, caption in enumerate(captions):
            level, side = re.search(r"(upper|middle|lower) (left|right) lung", caption).groups()
            third = ["upper", "middle", "lower"].index(level) * s // 3
            rows = slice(None) if self.level_blind else slice(third, third + s // 3)
            cols = slice(0, s // 2) if side == "left" else slice(s // 2, s)
            logits[i, 0, rows, cols] = 1.0
        return {"logits": logits}


def test_zone_table_rows_are_blob_zones_and_columns_asked_zones():
    from lab.demo_probes import ZONE_NAMES, zone_table

    size = 12
    blobs = []
    for z in range(6):  # one 2x2 blob in the middle of each zone (thirds of the height x halves of the width)
        level, side = divmod(z, 2)
        blob = np.zeros((size, size), bool)
        blob[4 * level + 1:4 * level + 3, 6 * side + 2:6 * side + 4] = True
        blobs.append(blob)
    images = torch.zeros(2, 1, size, size)
    exact = zone_table(_ZoneStub(size), images, [blobs, blobs[:3]])
    np.testing.assert_array_equal(exact, np.eye(6))
    blind = zone_table(_ZoneStub(size, level_blind=True), images, [blobs, blobs[:3]])
    same_side = np.array([[float(a.split()[1] == b.split()[1]) for b in ZONE_NAMES] for a in ZONE_NAMES])
    np.testing.assert_array_equal(blind, same_side)


def test_zone_separation_reads_the_pairs_a_table_tells_apart():
    from lab.demo_probes import ZONE_NAMES, zone_separation

    assert set(zone_separation(np.eye(6)).values()) == {1.0}
    side_only = np.array([[float(a.split()[1] == b.split()[1]) for b in ZONE_NAMES] for a in ZONE_NAMES])
    assert zone_separation(side_only) == {"left/right": 1.0, "upper/middle": 0.0, "upper/lower": 0.0,
                                          "middle/lower": 0.0}
    middle_vs_rest = side_only.copy()  # levels: middle told apart, upper and lower confused
    for i, a in enumerate(ZONE_NAMES):
        for j, b in enumerate(ZONE_NAMES):
            if ("middle" in a) != ("middle" in b):
                middle_vs_rest[i, j] = 0.0
    assert zone_separation(middle_vs_rest) == {"left/right": 1.0, "upper/middle": 1.0, "upper/lower": 0.0,
                                               "middle/lower": 1.0}


def test_zone_probe_of_other_runs_never_overwrites_the_readme_summary(tmp_path, monkeypatch):
    from lab import experiments

    calls = []
    monkeypatch.setattr(experiments, "zone_probe", lambda folders, demo, summary: calls.append((folders, summary)))
    experiments.main(["zone-probe", "--runs", str(tmp_path / "a"), str(tmp_path / "b")])
    assert calls[-1] == ([str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "a" / "zone_probe.json")
    experiments.main(["zone-probe"])  # the README's grids, into the default summary
    folders, summary = calls[-1]
    assert summary is None and [p.split("/")[-1] for p in folders] == [
        "demo_ablation", "demo_long", "demo_heads4", "demo_text_encoder", "demo_mcm_attention"]


class _AttentionStub:
    """Stage-2 attention over a 6 × 6 grid, made by hand: `selective` puts weight 0.5 on each of the
    caption's two zone words for tokens inside the named zone and 0.05 elsewhere; otherwise every
    token gives them 0.3 (the caption broadcast to the whole image)."""

    def __init__(self, selective: bool):
        from types import SimpleNamespace

        from tmc.text import bert_uncased_tokenizer

        self.selective = selective
        self.text = SimpleNamespace(tokenizer=bert_uncased_tokenizer())

    def tokenize(self, captions):
        return dict(self.text.tokenizer(captions, padding="max_length", max_length=24, return_tensors="pt"))

    def __call__(self, image, input_ids, attention_mask, token_type_ids=None, return_attention=False):
        G = 6
        attn = torch.zeros(len(input_ids), G * G, input_ids.shape[1])
        for i, ids in enumerate(input_ids):
            words = self.text.tokenizer.convert_ids_to_tokens(ids.tolist())
            level, side = words.index(next(w for w in words if w in ("upper", "middle", "lower"))), \
                words.index(next(w for w in words if w in ("left", "right")))
            rows = {"upper": range(0, 2), "middle": range(2, 4), "lower": range(4, 6)}[words[level]]
            cols = range(0, 3) if words[side] == "left" else range(3, 6)
            inside = torch.zeros(G, G, dtype=torch.bool)
            inside[list(rows)[0]:list(rows)[-1] + 1, cols[0]:cols[-1] + 1] = True
            weight = torch.where(inside.reshape(-1), 0.5, 0.05) if self.selective else torch.full((G * G,), 0.3)
            attn[i, :, level] = weight
            attn[i, :, side] = weight
        return {"attention": {2: attn}}


def test_zone_attention_tells_reading_where_the_words_point_from_broadcasting():
    from lab.demo_probes import zone_attention

    images = torch.zeros(2, 1, 24, 24)
    assert zone_attention(_AttentionStub(selective=True), images) == {"inside": 1.0, "outside": 0.1,
                                                                        "focus": 10.0}
    assert zone_attention(_AttentionStub(selective=False), images) == {"inside": 0.6, "outside": 0.6,
                                                                         "focus": 1.0}
