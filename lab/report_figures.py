"""Every figure the prose of README.md and results/README.md quotes, with the files it comes from
(lab.quotes.Quote: the phrase, `{}` per figure, and the figures as the files give them). Settings
and published figures are listed too, without files, so that a figure missing here is reported."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from lab.quotes import Quote
from lab.result_files import (PLAIN_QATA_RUN, bench, binds, cap, cpu_ratios, cuda_ms, equal_steps, grid,
                               grid_runs, op_total, paired, probe, protocol, qata_mean, read_json, split_sizes,
                               steps, time_limit, wall, walls)

QUICK_START_RUN = "demo_default/default-s0"  # `python train.py --dataset demo`, seed 0
PAPER_PARAMETERS = 242.8e6  # the paper's count


# ---------------------------------------------------------------------------- writing figures

def _f(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def _signed(x: float, digits: int = 3) -> str:
    return f"{x:+.{digits}f}".replace("-", "−")


def _pm(values: list[float]) -> tuple[str, str]:
    return _f(statistics.fmean(values)), _f(statistics.stdev(values))


def _signed_pm(values: list[float]) -> tuple[str, str]:
    return _signed(statistics.fmean(values)), _f(statistics.stdev(values))


def _points(x: float) -> str:
    return _f(100 * x, 1)


def _min_s(seconds: float) -> tuple[str, str]:
    m, s = divmod(round(seconds), 60)
    return str(m), str(s)


def _bound(holds: bool, text: str) -> str:
    """A threshold the prose states: the text itself when the files bear it out."""
    return text if holds else f"not {text}"


def _pm_of(*grids: tuple[str, str]):
    """mean, ± of each (grid, variant) in turn."""
    return lambda r: sum((_pm(grid(r, g, v)) for g, v in grids), ())


# ---------------------------------------------------------------------------- README.md

def _quick_start(r: Path) -> tuple[str, ...]:
    t = read_json(r, f"{QUICK_START_RUN}/test_metrics.json")
    return _f(t["dice"], 4), _f(t["miou"], 4), str(t["n_images"]), _f(t["dice_global"], 4)


def _captions_departure(r: Path) -> tuple[str, ...]:
    s = read_json(r, "qata_captions/captions_summary.json")["variants"]
    out = ()
    for condition in ("reworded", "empty", "template"):
        d = s["sentence"][condition]["dice"]
        out += (_f(d["mean"]), _f(d["std"]), _f(s["literal"][condition]["dice"]["mean"]))
    return out


def _sentence_choice(r: Path) -> tuple[str, str]:
    val = read_json(r, "qata_captions/captions_val_summary.json")["variants"]
    return _f(val["sentence"]["template"]["dice"]["mean"]), _f(val["tokens"]["template"]["dice"]["mean"])


README = [
    Quote("test Dice {} mIoU {} (per-image mean over {}; global Dice {};", _quick_start),
    Quote("after about {} min {} s on an otherwise idle 2-core CPU", lambda r: _min_s(wall(r, QUICK_START_RUN))),
    Quote("Seeds 0, 1 and 2 give {}, {} and {} (`results/demo_default`)",
          lambda r: tuple(map(_f, grid(r, "demo_default", "default")))),
    Quote("segmenting every blob scores Dice {} and the image-only model (`--no-text`) {}.", lambda r: (
        _f(read_json(r, "demo_default/caption_swap.json")["every_blob_dice"]),
        _f(grid(r, "demo_default", "no-text")[0]))),
    Quote("training step ({} for the paper preset, `results/op_count/paper.json`)",
          lambda r: (f"{read_json(r, 'op_count/paper.json')['total']:,}",)),
    # the caption robustness paragraph: differences of the table's figures as the table shows them
    Quote("({} below it per image, {} globally)", lambda r: (
        _f(cap(r, "no-text", "template") - cap(r, "sentence", "empty")),
        _f(cap(r, "no-text", "template", "dice_global") - cap(r, "sentence", "empty", "dice_global")))),
    Quote("template's words helps ({} over image-only)",
          lambda r: (_signed(cap(r, "sentence", "template") - cap(r, "no-text", "template")),)),
    Quote("they score {} below image-only and {} below no caption (the literal model loses {})", lambda r: (
        _f(cap(r, "no-text", "template") - cap(r, "sentence", "reworded")),
        _f(cap(r, "sentence", "empty") - cap(r, "sentence", "reworded")),
        _f(cap(r, "literal", "template") - cap(r, "literal", "reworded"), 1))),
    Quote("A wrong caption costs {}:",
          lambda r: (_f(cap(r, "sentence", "template") - cap(r, "sentence", "shuffled"), 2),)),
    Quote("`small` preset on {} images of a QaTa-COV19 subset", lambda r: (f"{split_sizes(r)[0]:,}",)),
    # departures
    Quote("first demo {} ± {} against {} ± {}. `--alignment-form literal`",
          _pm_of(("demo_ablation", "full"), ("demo_ablation", "literal-alignment"))),
    Quote("ignore the caption, {} ± {} against {} ± {}. `--alignment-through-mcm`",
          _pm_of(("demo_ablation", "alignment-through-mcm"), ("demo_ablation", "full"))),
    Quote("first demo {} ± {} against {} ± {}. `--text-length 10`",
          _pm_of(("demo_token_length", "T24"), ("demo_token_length", "T10"))),
    Quote("held-out QaTa, sigmoid recipe, {} ± {} against {} ± {}. `--augment paper`",
          _pm_of(("qata_cpu/protocol", "best"), ("qata_cpu/protocol_variants", "paper-augment"))),
    Quote("reworded captions {} ± {} against {}, none {} ± {} against {}, the template's words {} ± {} against {} (literal:",
          _captions_departure),
    Quote("MiniLM fine-tuned, {} ± {} against the softmax's {} ± {}.",
          _pm_of(("demo_mcm_attention", "minilm-sigmoid"), ("demo_mcm_attention", "minilm"))),
    Quote("batches of 16 (8 give {} ± {} against {} ± {})",
          _pm_of(("demo_recipe", "batch-8"), ("demo_recipe", "default"))),
    Quote("(validation {} against {} with [CLS])", _sentence_choice),
    # settings and published figures
    Quote("λ = 0.1"), Quote("×0.1 after"), Quote("threshold 0.5"), Quote("plus 20% of the tumour-free slices"),
    Quote('width="49%"'), Quote("(84.65 Dice with pretrained encoders"),
]


# ---------------------------------------------------------------------------- results/README.md

def _plateau_stall(r: Path) -> tuple[str, ...]:
    """The stalled seed of demo_default_plateau10: its best validation Dice, the lr cut, the stop."""
    run = "demo_default_plateau10/default-s1"
    epochs = [json.loads(line) for line in (r / run / "metrics.jsonl").read_text().splitlines() if line]
    best = max(epochs, key=lambda e: e["val_dice"])
    cut = next(e for e in epochs if e["lr"] < epochs[0]["lr"] / 5)
    return (_f(best["val_dice"]), str(best["epoch"]), str(cut["epoch"]), str(len(epochs)), f"{steps(r, run):,}",
            _f(read_json(r, f"{run}/test_metrics.json")["dice"]))


def _demo_thresholds(r: Path) -> tuple[str, str, str]:
    gaps = [g["gap"] for g in read_json(r, "demo_default/caption_swap.json")["runs"].values()]
    return (_bound(min(grid(r, "demo_default", "default")) > 0.90, "0.90"),
            _bound(max(grid(r, "demo_default", "no-text")) < 0.65, "0.65"), _bound(min(gaps) > 0.5, "0.5"))


def _ablation_gap(r: Path) -> tuple[str]:
    swaps = read_json(r, "demo_ablation/caption_swap.json")["runs"]
    gaps = [g["gap"] for run, g in swaps.items() if run.startswith("full-")]
    return (_bound(min(gaps) > 0.3, "0.3"),)


def _demo_walls(r: Path) -> tuple[str, ...]:
    times = walls(r, "demo_default", "default")
    return (*_min_s(min(times)), *_min_s(max(times)), *_min_s(walls(r, "demo_default", "no-text")[0]))


def _earlier_demo(r: Path) -> tuple[str, ...]:
    times = walls(r, "demo_recipe", "default")
    return (*map(_f, grid(r, "demo_recipe", "default")), *_min_s(min(times)), *_min_s(max(times)))


def _redrift(r: Path) -> tuple[str, str]:
    return _signed_pm([a - b for a, b in zip(grid(r, "demo_default", "default"), grid(r, "demo_recipe", "default"))])


def _batch8_default(r: Path) -> tuple[str, str, str]:
    times = walls(r, "demo_default_batch8", "default")
    most = max(steps(r, run) for run in grid_runs(r, "demo_default_batch8", "default"))
    return f"{most:,}", _f(min(times) / 60, 1), _f(max(times) / 60, 1)


def _batch8_recipe(r: Path) -> tuple[str, str, str]:
    dice = grid(r, "demo_recipe", "batch-8")
    return (*_pm(dice), _bound(sum(d < 0.88 for d in dice) == 1, "0.88"))


def _batch8_time(r: Path) -> tuple[str]:
    ratio = statistics.fmean(walls(r, "demo_recipe", "batch-8")) / statistics.fmean(
        walls(r, "demo_recipe", "lesion-0.075"))
    return (_f(ratio, 1),)


def _gpu_profile(r: Path) -> tuple[str, str, str]:
    return _f(cuda_ms(r), 1), _f(cuda_ms(r) / 3, 0), _f(bench(r, "train_b32_eager")["train_step_ms"], 0)


def _cpu_pm(r: Path, name: str, preset: str) -> tuple[str, str]:
    ratios = cpu_ratios(r, name, preset)
    return _f(statistics.fmean(ratios), 2), _f(statistics.stdev(ratios), 2)


def _text_pays(r: Path) -> tuple[str, str]:
    return tuple(_points(qata_mean(r, "best", key) - qata_mean(r, "no-text", key)) for key in ("dice", "dice_global"))


def _quartile(r: Path, v: str, key: str = "dice", digits: int = 3) -> str:
    return _f(protocol(r, v)["quartiles"][0][key]["mean"], digits)


def _equal(r: Path, v: str) -> str:
    return _f(protocol(r, v)["at_equal_steps"]["dice"]["mean"])


def _shuffled_cost(r: Path, v: str) -> str:
    return _f(100 * (qata_mean(r, v) - qata_mean(r, v, "shuffled_dice")), 0)


def _softmax_against_sigmoid(r: Path) -> tuple[str, ...]:
    return (*_pm(grid(r, "qata_cpu/protocol_variants", "softmax")),
            *_pm(grid(r, "qata_cpu/protocol_variants", "softmax", "dice_global")),
            _f(qata_mean(r, "best")), _f(qata_mean(r, "best", "dice_global")))


def _softmax_seeds(r: Path) -> tuple[str, ...]:
    return tuple(map(_f, grid(r, "qata_cpu/protocol_variants", "softmax") + grid(r, "qata_cpu/protocol", "best")))


def _softmax_equal_and_shuffled(r: Path) -> tuple[str, ...]:
    return (f"{equal_steps(r):,}", _equal(r, "softmax"), _equal(r, "best"), _shuffled_cost(r, "softmax"),
            _f(qata_mean(r, "softmax", "shuffled_dice")))


def _softmax_over_image_only(r: Path) -> tuple[str, ...]:
    out = ()
    for key in ("dice", "dice_global"):
        softmax, image_only = qata_mean(r, "softmax", key), qata_mean(r, "no-text", key)
        out += (_points(softmax - image_only), _f(softmax), _f(image_only))
    return out


def _paper_augment(r: Path) -> tuple[str, ...]:
    diffs = paired(r, "paper-augment", "best")
    return (_points(-statistics.fmean(diffs)), *_pm(grid(r, "qata_cpu/protocol_variants", "paper-augment")),
            *_signed_pm(diffs), _signed(statistics.fmean(paired(r, "paper-augment", "best", "dice_global"))))


def _single_change(r: Path, v: str, against: str = "best") -> tuple[str, ...]:
    """Variant v minus `against`, seed by seed: per image mean and ±, global mean and ±."""
    return (*_signed_pm(paired(r, v, against)), *_signed_pm(paired(r, v, against, "dice_global")))


def _plain_qata(r: Path) -> tuple[str, ...]:
    t = read_json(r, f"{PLAIN_QATA_RUN}/test_metrics.json")
    return (*_min_s(wall(r, PLAIN_QATA_RUN)), _f(t["dice"], 4), _f(t["dice_global"], 4))


def _softmax_run(r: Path) -> dict:
    return read_json(r, "qata_cpu/protocol_variants/softmax-s0/config.json")["train"]


def _images_seen(r: Path) -> float:
    return qata_mean(r, "softmax", "steps") * _softmax_run(r)["batch_size"]


def _against_published(r: Path) -> tuple[str, ...]:
    train, val = split_sizes(r)
    return (_points(qata_mean(r, "softmax")), _points(qata_mean(r, "softmax", "dice_global")), f"{train:,}", str(val),
            f"{_softmax_run(r)['time_limit']:g}", f"{round(qata_mean(r, 'softmax', 'steps'), -2):,.0f}",
            str(_softmax_run(r)["batch_size"]))


RESULTS = [
    Quote("parameters land within {}%", lambda r: (
        str(math.ceil(100 * abs(1 - bench(r, "train_b8_eager")["params_total"] / PAPER_PARAMETERS))),)),
    Quote("medians of {} steps after warm-up", lambda r: (str(bench(r, "train_b32_eager")["steps"]),)),
    Quote("shows {} ms of GPU kernel time over its 3 profiled steps, about {} ms of each {} ms step", _gpu_profile),
    Quote("at {} kernel-launching ops per training step",
          lambda r: (f"{op_total(r, 'op_count/paper-b6d4b30.txt'):,}",)),
    Quote("but its {} ms step is still not GPU-bound; compiling took `row_wall_s` = {} s", lambda r: (
        _f(bench(r, "train_b32_compile")["train_step_ms"], 0), _f(bench(r, "train_b32_compile")["row_wall_s"], 0))),
    Quote("It was {} under autocast (`results/op_count/paper-b6d4b30.txt`) and {} at 9284fc6", lambda r: (
        f"{op_total(r, 'op_count/paper-b6d4b30.txt'):,}", f"{op_total(r, 'op_count/paper.txt'):,}")),
    Quote("each of the {} Linear layers (`addmm` in",
          lambda r: (str(read_json(r, "op_count/paper.json")["top_ops"]["addmm"]),)),
    Quote("each of the {} LayerNorms",
          lambda r: (str(read_json(r, "op_count/paper.json")["top_ops"]["native_layer_norm"]),)),
    Quote("The `small` preset's {}x against 597b7e4", lambda r: _cpu_pm(r, "bench_cpu_ops", "small")[:1]),
    Quote("The same again within the noise ({}x ± {} for `small`)",
          lambda r: _cpu_pm(r, "bench_cpu_windows_vs_9284fc6", "small")),
    Quote("40 passes over the 420 training images ({} steps)", lambda r: (f"{steps(r, QUICK_START_RUN):,}",)),
    Quote("Every seed passes {} and the image-only model stays below {}; shuffling the captions costs every run "
          "more than {}.", _demo_thresholds),
    Quote("A text-guided run takes {} min {} s to {} min {} s on the 2 cores (the image-only run {} min {} s)",
          _demo_walls),
    Quote("the same command gave {}, {} and {} in {} min {} s to {} min {} s", _earlier_demo),
    Quote("Paired by seed, the new runs differ by {} ± {}.", _redrift),
    Quote("the first demo, batches of 8, {} steps, {} to {} minutes", _batch8_default),
    Quote("about {}x the time of the batch-16 runs of the first demo", _batch8_time),
    Quote("same steps) reach {} ± {}, one seed of three below {}", _batch8_recipe),
    Quote("instead of about two) reach {} ± {}", _pm_of(("demo_recipe", "lesion-0.075"))),
    Quote("on 2 × 2 lesions: {} against {} at 500 steps",
          lambda r: (_f(probe(r, "lesions-2x2", 500), 2), _f(probe(r, "lesions-1x1", 500), 2))),
    Quote("Its seed 1 stalled at validation Dice {} from epoch {}; the lr was cut tenfold at epoch {} and the run "
          "stopped at epoch {} ({} steps) at {}.", _plateau_stall),
    Quote("the shuffled captions cost every seed more than {})", _ablation_gap),
    Quote("learn the sides only and stop near {}.",
          lambda r: (_f(statistics.fmean(sorted(grid(r, "demo96", "full"))[:2]), 2),)),
    Quote("apart at {} or more.", lambda r: (_f(binds(), 2),)),
    Quote("(`--split-mode layout-val`: {} train / {} val images)",
          lambda r: (f"{split_sizes(r)[0]:,}", str(split_sizes(r)[1]))),
    Quote("Every run trains for the same {} minutes", lambda r: (time_limit(r, "qata_cpu/protocol/best-s0"),)),
    Quote("without it by {} points of per-image Dice and {} of global Dice", _text_pays),
    Quote("it ran {}% fewer steps",
          lambda r: (_f(100 * (1 - qata_mean(r, "best", "steps") / qata_mean(r, "no-text", "steps")), 0),)),
    Quote("({} steps: {} against {})", lambda r: (f"{equal_steps(r):,}", _equal(r, "best"), _equal(r, "no-text"))),
    Quote("(Q1: {} against {})", lambda r: (_quartile(r, "best"), _quartile(r, "no-text"))),
    Quote("paints {} times the true area and the text-guided one {} times",
          lambda r: (_quartile(r, "no-text", "area_ratio", 1), _quartile(r, "best", "area_ratio", 1))),
    Quote("costs it {} points ({} to {})",
          lambda r: (_shuffled_cost(r, "best"), _f(qata_mean(r, "best")), _f(qata_mean(r, "best", "shuffled_dice")))),
    Quote("compares them at {} steps.", lambda r: (f"{equal_steps(r):,}",)),
    Quote("real captions: {} ± {} per image and {} ± {} global against sigmoid's {} and {}",
          _softmax_against_sigmoid),
    Quote("ahead on every seed ({} / {} / {} against {} / {} / {})", _softmax_seeds),
    Quote("and at {} steps ({} against {}); shuffled captions cost it {} points ({}).", _softmax_equal_and_shuffled),
    Quote("it is {} points ahead per image ({} against {}) and {} global ({} against {})", _softmax_over_image_only),
    Quote("augmentation loses {} points** ({} ± {}; {} ± {} seed by seed, {} global)", _paper_augment),
    Quote("No alignment loss: {} ± {} per image, {} global** against `best`",
          lambda r: _single_change(r, "no-alignment")[:3]),
    Quote("it is {} ± {} per image; it has not been run", lambda r: _single_change(r, "no-alignment", "softmax")[:2]),
    Quote("bottleneck only: {} ± {} per image, {} ± {} global** against `best`",
          lambda r: _single_change(r, "bottleneck-only")),
    Quote("(sigmoid word weights too; {} ± {} against the softmax preset)",
          lambda r: _single_change(r, "bottleneck-only", "softmax")[:2]),
    Quote("ours {} over no text at all", lambda r: ("+" + _text_pays(r)[0],)),
    Quote("trains 72 epochs of 50 steps in {} min {} s and scores {} per-image and {} global Dice", _plain_qata),
    Quote("the softmax variant's {} ± {} and {} ± {}.", lambda r: _softmax_against_sigmoid(r)[:4]),
    Quote("| ours, `--preset small`, softmax | {} | {} | {} train / {} val of the QaTa-COV19 subset, its 500 "
          "`valid` images as test | MiniLM (frozen), Swin from random weights | {} min on one CPU thread, 96², "
          "~{} steps of {} |",
          _against_published),
    Quote("a third of the training images ({} against 5,716)", lambda r: (f"{split_sizes(r)[0]:,}",)),
    Quote("(Q1, the smallest lesions, scores {} and loses most)", lambda r: (_quartile(r, "softmax", digits=2),)),
    Quote("about {} training images seen (some {} passes over the subset)", lambda r: (
        f"{round(_images_seen(r), -4):,.0f}", _f(_images_seen(r) / split_sizes(r)[0], 0))),
    Quote("to be read against our {}; the paper's and LViT's are per-image means, against our {}.",
          lambda r: (_points(qata_mean(r, "softmax", "dice_global")), _points(qata_mean(r, "softmax")))),
    # settings and published figures
    Quote("mean radius 0.075 of the side"), Quote("40 epochs of 25 steps"), Quote("threshold 0.5"),
    Quote("(242.8 M parameters, 145.7 \"GFLOPs\")"), Quote("lesions of mean radius 0.1125"),
    Quote("80 epochs of 50 steps"), Quote("160 epochs of 25 steps"), Quote("the paper's 0.1 is"),
    Quote("Against the paper's 84.65"), Quote("+0.58 Dice with MCM on QaTa (84.07 → 84.65)"),
    Quote("row gains +0.60 over"), Quote("| TMC paper (Table 1) | 84.65 |"),
    Quote("| LViT-T (its README) | 83.66 | — | 5,716 train / 1,429 val"),
    Quote("| GuideDecoder (its paper) | — | 89.78 |"),
]

QUOTES = {"README.md": README, "results/README.md": RESULTS}
