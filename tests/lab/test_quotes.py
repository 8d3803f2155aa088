"""lab.quotes and lab.report_figures: every figure in the prose of README.md and results/README.md is
a generated table's, or a quote recomputed from the files in results/."""
import json

from lab import quotes, report
from lab.quotes import Quote
from lab.report_figures import QUOTES

RESULTS = report.REPO / "results"


def test_a_quote_is_found_across_a_line_break_and_its_stale_figure_mended(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"dice": 0.9294, "steps": 1080}))
    figures = lambda r: (f"{json.loads((r / 'run.json').read_text())['dice']:.3f}",)  # noqa: E731
    text = ("Seed 1 gives\n0.930 on the test split.\n<!-- table:x -->\n| 0.111 |\n<!-- end table -->\n"
            "Set `--caption-dropout 0.2`; λ = 0.1.\n")
    problems, mended = quotes.check("doc.md", text, [Quote("Seed 1 gives {} on the test", figures),
                                                     Quote("λ = 0.1")], tmp_path)
    assert problems == ["doc.md:2: 0.930 where the files give 0.929 (in 'Seed 1 gives {} on the test')"]
    assert mended == text.replace("0.930", "0.929")
    assert quotes.check("doc.md", mended, [Quote("Seed 1 gives {} on the test", figures), Quote("λ = 0.1")],
                        tmp_path) == ([], mended)


def test_a_figure_outside_tables_and_quotes_and_a_lost_quote_are_reported(tmp_path):
    text = "Training took 4 min 38 s, 1,080 steps, 14% faster: Dice 0.902 (torch 2.13.0, §4.2, `lesion=0.075`).\n"
    problems, _ = quotes.check("doc.md", text, [Quote("threshold 0.5")], tmp_path)
    assert problems == ["doc.md: the quote 'threshold 0.5' is not in the text"] + [
        f"doc.md:1: {f!r} is in no generated table and no quote of lab/report_figures.py"
        for f in ("4 min", "38 s", "1,080", "14%", "0.902")]


def test_every_figure_of_the_documents_prose_is_checked_and_matches_its_files():
    for doc in report.DOCUMENTS:
        text = (report.REPO / doc).read_text()
        assert quotes.check(doc, text, QUOTES[doc], RESULTS) == ([], text)


def test_figures_that_once_disagreed_with_their_files_are_caught():
    readme = (report.REPO / "README.md").read_text()
    assert "give 0.902, 0.929 and" in readme  # seed 1 of the demo (once written 0.930)
    problems, _ = quotes.check("README.md", readme.replace("0.929 and", "0.930 and"), QUOTES["README.md"], RESULTS)
    assert [p.split(": ", 1)[1][:30] for p in problems] == ["0.930 where the files give 0.9"]
    log = (report.REPO / "results/README.md").read_text()
    assert "by 4.7 points" in log  # the sigmoid recipe over image-only (once written 4.6)
    problems, _ = quotes.check("results/README.md", log.replace("by 4.7 points", "by 4.6 points"),
                               QUOTES["results/README.md"], RESULTS)
    assert len(problems) == 1 and "4.6 where the files give 4.7" in problems[0]
    problems, _ = quotes.check("results/README.md", log + "\nIt was 2,860 ops.\n", QUOTES["results/README.md"], RESULTS)
    assert problems == [f"results/README.md:{log.count(chr(10)) + 2}: '2,860' is in no generated table and no "
                        "quote of lab/report_figures.py"]


def test_the_summary_counts_each_runs_steps_so_an_early_stop_shows():
    assert [report.run_steps(RESULTS / f"demo_ablation/full-s{s}") for s in range(3)] == [650, 875, 1000]
    row = next(line for line in report.summary(RESULTS).splitlines() if "`results/qata_cpu/protocol_variants`" in line)
    assert "| 3,150 / 3,920 / 4,300 |" in row and "at most 20 min" in row


def test_a_quote_never_takes_part_of_a_number(tmp_path):
    text = "Dice 0.741 (one seed). It took 10.5 steps.\n"
    problems, mended = quotes.check("doc.md", text, [Quote("Dice {}."), Quote("took {} steps", lambda r: ("10.6",))],
                                    tmp_path)
    assert problems[:2] == ["doc.md: the quote 'Dice {}.' is not in the text",
                            "doc.md:1: 10.5 where the files give 10.6 (in 'took {} steps')"]
    assert mended == text.replace("10.5", "10.6")
