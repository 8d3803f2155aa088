"""lab.report: the tables of README.md and results/README.md are what the files in results/ give."""
import json
import re

from lab import report

RESULTS = report.REPO / "results"


def test_every_generated_table_matches_the_results_files():
    for doc in report.DOCUMENTS:
        text = (report.REPO / doc).read_text()
        assert report.render(text, RESULTS) == text, f"{doc}: run `python -m lab.report`"
    names = [m.group(2) for m in report.BLOCK.finditer((RESULTS / "README.md").read_text())]
    assert set(names) == set(report.TABLES) - set(report.README_TABLES)  # every other table in the log
    assert len(names) == len(set(names))  # once each
    readme = [m.group(2) for m in report.BLOCK.finditer((report.REPO / "README.md").read_text())]
    assert readme == list(report.README_TABLES)


def test_a_stale_table_is_rebuilt():
    stale = "intro\n<!-- table:heads4 -->\n| variant | Dice |\n| full | 0.999 |\n<!-- end table -->\nafter\n"
    fresh = report.render(stale, RESULTS)
    assert fresh != stale and fresh.startswith("intro\n<!-- table:heads4 -->\n| variant |")
    assert fresh.endswith("<!-- end table -->\nafter\n") and "0.999" not in fresh
    assert report.render(fresh, RESULTS) == fresh


def test_grid_rows_carry_the_means_of_each_runs_own_result_file():
    """Each row's mean ± std, recomputed here from the test_metrics.json that train.py wrote in each
    run's folder (not from the copy of the values inside summary.json)."""
    from tmc.metrics import mean_std

    for name in ("demo_ablation", "demo_mcm_attention_long", "demo_text_encoder"):
        table = report.grid(RESULTS, name)
        summary = json.loads((RESULTS / name / "summary.json").read_text())
        for variant, v in summary["variants"].items():
            dice = [json.loads((report.REPO / r["run"] / "test_metrics.json").read_text())["dice"]
                    for r in v["runs"]]
            mean, std = mean_std(dice)
            row = next(line for line in table.splitlines() if line.startswith(f"| {variant} |"))
            assert f"{mean:.3f} ± {std:.3f}" in row and len(dice) == v["dice"]["n"]


def test_binding_counts_follow_the_zone_probe():
    table = report.grid(RESULTS, "demo_mcm_attention", binding=True)
    counts = dict(re.findall(r"^\| ([\w-]+) \|.*\| (\d of \d) \|$", table, re.M))
    # From results/demo_zone_probe/summary.json: seed 0 alone of the random-BERT sigmoid runs tells
    # apart every pair at 0.95 or more (seed 2's middle/lower is 0.66).
    assert counts == {"random-bert": "0 of 5", "random-bert-sigmoid": "1 of 5", "minilm": "1 of 5",
                      "minilm-sigmoid": "2 of 5"}
    assert report.binds_all_zones({"separation": {"a": 0.95, "b": 1.0}})
    assert not report.binds_all_zones({"separation": {"a": 0.949, "b": 1.0}})
