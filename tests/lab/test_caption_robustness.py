"""lab.caption_robustness summarises runs scored before from their captions*.json alone, and refuses
a run with neither best.pt nor scores made with the same seeds."""
import json

import pytest

from lab import caption_robustness as cr


def _scored_run(folder, dice, split="test", reword_seed=0):
    folder.mkdir(parents=True)
    scores = {c: {"dice": dice + i / 100, "dice_global": dice + i / 50} for i, c in enumerate(cr.CONDITIONS)}
    name = "captions.json" if split == "test" else f"captions_{split}.json"
    (folder / name).write_text(json.dumps({"split": split, "reword_seed": reword_seed, "shuffle_seed": 0,
                                           "steps": 100, **scores}))
    return folder


def test_scored_runs_are_summarised_without_their_checkpoints(tmp_path):
    runs = [_scored_run(tmp_path / f"sentence-s{s}", 0.5 + s / 10) for s in range(2)]
    cr.main([str(r) for r in runs] + ["--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "captions_summary.json").read_text())
    s = summary["variants"]["sentence"]
    assert s["seeds"] == 2 and s["template"]["dice"]["mean"] == pytest.approx(0.55)
    assert s["shuffled"]["dice_global"]["mean"] == pytest.approx(0.55 + 3 / 50)
    assert "| sentence | 2 | 100 |" in (tmp_path / "out" / "captions_table.md").read_text()


@pytest.mark.parametrize("split, reword_seed", [("val", 0), ("test", 1)])
def test_a_run_without_best_pt_or_matching_scores_is_refused(tmp_path, split, reword_seed):
    run = _scored_run(tmp_path / "sentence-s0", 0.5, split=split, reword_seed=reword_seed)
    with pytest.raises(SystemExit, match="no best.pt; fix: pass the folder of a finished run"):
        cr.main([str(run), "--out", str(tmp_path / "out")])
