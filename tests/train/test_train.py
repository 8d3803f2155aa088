"""train.py: flags generated from the configs, per-dataset defaults, non-finite losses, exact resume,
Ctrl-C and out-of-memory handling, atomic checkpoints."""
import dataclasses
import json
import math
import os
import random

import numpy as np
import pytest
import torch

import train
from tmc import epoch_loop
from tmc.checkpoint import load_checkpoint, save_checkpoint
from tmc.config import ModelConfig, get_config
from tmc.engine import (NonFiniteGuard, NonFiniteLossError, capture_rng, make_train_step, restore_rng,
                        train_one_epoch)
from tmc.optim import make_scheduler, parameter_groups
from tmc.train_config import (
    DATASET_DEFAULTS, TrainConfig, build_parser, explicit_overrides, resolve_model_config,
    resolve_train_config,
)


def _resolve(argv):
    train_over, model_over = explicit_overrides(build_parser().parse_args(argv))
    cfg = resolve_train_config(train_over)
    return cfg, resolve_model_config(cfg.preset, model_over)


# ---------------------------------------------------------------------------- flags

def test_every_config_field_is_a_flag():
    options = build_parser()._option_string_actions
    for cls in (TrainConfig, ModelConfig):
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in options, f.name


def test_paper_defaults_per_dataset_and_explicit_flags_win():
    cfg, model = _resolve(["--dataset", "mosmed"])
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.patience) == (1e-3, 8, 200, 20)
    assert (cfg.plateau_patience, cfg.plateau_factor) == (10, 0.1)
    assert (cfg.alignment_weight, cfg.seg_loss) == (0.1, "bce")
    assert cfg.preset == "paper" and model.image_size == 224 and model.text_length == 24
    assert model.text_model == "bert-base-uncased" and not model.freeze_text
    for name in ("qata", "duke"):
        assert _resolve(["--dataset", name])[0].lr == 3e-4
    demo, tiny = _resolve([])
    assert demo.dataset == "demo" and demo.preset == "demo" and tiny.image_size == 64
    assert _resolve(["--dataset", "mosmed", "--lr", "5e-4"])[0].lr == 5e-4
    assert _resolve(["--dataset", "demo", "--preset", "paper"])[1].image_size == 224
    cfg, small = _resolve(["--dataset", "qata", "--preset", "small"])
    assert cfg.preset == "small" and small == get_config("small")
    assert _resolve(["--preset", "small", "--image-size", "128"])[1].image_size == 128
    assert set(DATASET_DEFAULTS) == {"demo", "qata", "mosmed", "mosmedplus", "duke", "csv"}


def test_the_small_preset_on_qata_brings_its_whole_recipe():
    """`--dataset qata --preset small` alone gives the recipe of the QaTa protocol; the paper preset on
    QaTa keeps the paper's settings but for the augmentation, and an explicit flag still wins."""
    cfg, _ = _resolve(["--dataset", "qata", "--preset", "small"])
    assert (cfg.split_mode, cfg.augment, cfg.seg_loss, cfg.lr, cfg.max_steps_per_epoch, cfg.lr_schedule,
            cfg.epochs, cfg.workers) == ("layout-val", "text-consistent", "bce+dice", 1e-3, 50, "cosine",
                                         72, 0)
    paper, _ = _resolve(["--dataset", "qata"])
    # the paper preset on QaTa: the paper's settings but the augmentation that keeps captions true
    assert (paper.split_mode, paper.augment, paper.seg_loss, paper.lr, paper.lr_schedule) == (
        "auto", "text-consistent", "bce", 3e-4, "plateau")
    assert _resolve(["--dataset", "qata", "--preset", "small", "--augment", "paper"])[0].augment == "paper"
    assert _resolve(["--dataset", "qata", "--preset", "small"])[1].mcm_attention == "softmax"
    assert _resolve(["--dataset", "mosmed", "--preset", "small"])[0].augment == "paper"  # not measured there


def test_ablation_flags():
    _, m = _resolve(["--dataset", "qata", "--mcm-stages", "none", "--no-alignment",
                     "--alignment-form", "literal", "--text-length", "10", "--freeze-text",
                     "--text-model", "minilm"])
    assert m.mcm_stages == () and not m.use_alignment and m.alignment_form == "literal"
    assert m.text_length == 10 and m.freeze_text and m.text_model == "minilm"
    assert _resolve(["--mcm-stages", "4"])[1].mcm_stages == (4,)
    assert not _resolve(["--no-text"])[1].use_text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--amp", "fp8"])


# ---------------------------------------------------------------------------- loop behaviour

class Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, image, **tokens):
        return {"logits": image * self.w, "alignment": []}


def _batches(values):
    return [{"image": torch.full((2, 1, 4, 4), v), "mask": torch.ones(2, 1, 4, 4),
             "text": ["a", "b"]} for v in values]


def test_nonfinite_losses_are_skipped_then_stop_the_run():
    model = Scale()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    common = dict(device=torch.device("cpu"), tokenize=lambda c: {}, progress=False)
    step = make_train_step(model, opt, torch.amp.GradScaler("cpu", enabled=False), TrainConfig(amp="off"),
                           device=torch.device("cpu"))
    guard = NonFiniteGuard(limit=3)
    batches = _batches([float("nan"), float("inf"), 1.0])
    stats = train_one_epoch(step, batches, guard=guard, **common)
    assert (stats["steps"], stats["skipped"], guard.total, guard.in_a_row) == (1, 2, 2, 0)
    w = model.w.detach().clone()
    with pytest.raises(NonFiniteLossError, match="non-finite losses in a row.*--lr"):
        train_one_epoch(step, _batches([float("nan")] * 5), guard=guard, **common)
    assert torch.equal(model.w.detach(), w)  # skipped steps never touch the weights


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(3)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_checkpoint(tmp_path / "r.pt", {"rng": capture_rng({"g": g})})
    expected = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=g))
    restore_rng(load_checkpoint(tmp_path / "r.pt")["rng"], {"g": g})
    got = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=g))
    assert got[:2] == expected[:2]
    assert torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])


# ---------------------------------------------------------------------------- whole runs (tiny)

@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_data")


def _argv(data, out, epochs, *extra):
    return ["--dataset", "demo", "--root", str(data / "demo"), "--cache-dir", str(data / "cache"),
            "--reader-options", "n=24", "--out", str(out), "--epochs", str(epochs),
            "--max-steps-per-epoch", "2", "--batch-size", "4", "--limit-eval-batches", "1",
            "--no-test-at-end", "--no-progress", "--workers", "0", "--device", "cpu",
            "--time-limit", "0", *extra]


def test_cuda_graphs_on_cpu_trains_eagerly_and_says_so(demo_dirs, tmp_path, capsys):
    result = train.main(_argv(demo_dirs, tmp_path / "g", 1, "--cuda-graphs"))
    assert "--cuda-graphs ignored: it needs a CUDA device; training eagerly" in capsys.readouterr().out
    assert load_checkpoint(result["last"])["epoch"] == 1


def _states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_continues_exactly(demo_dirs, tmp_path):
    # plateau: a cosine's horizon is --epochs, so a cosine run extended on resume is another schedule
    train.main(_argv(demo_dirs, tmp_path / "straight", 2, "--lr-schedule", "plateau"))
    train.main(_argv(demo_dirs, tmp_path / "split", 1, "--lr-schedule", "plateau"))
    result = train.main(["--out", str(tmp_path / "split"), "--resume", "--epochs", "2", "--no-progress"])
    assert result["last"] == str(tmp_path / "split" / "last.pt")

    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    _states_equal(a["model"], b["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        _states_equal(sa, sb)
    assert a["scheduler"] == b["scheduler"] and a["early_stop"] == b["early_stop"]
    rows = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("straight", "split")]
    assert [r["train_loss"] for r in rows[0]] == [r["train_loss"] for r in rows[1]]
    assert len(rows[0]) == 2

    # the checkpoint is a plain dict with the contract's keys, readable with weights_only=True
    for key in ("model", "model_config", "text_config", "train_config", "epoch", "optimizer",
                "scheduler", "scaler", "early_stop", "rng", "best_metric", "metrics"):
        assert key in b, key
    assert set(b["rng"][0]["generators"]) == {"augment", "loader"}
    config = json.loads((tmp_path / "split" / "config.json").read_text())
    assert config["train"]["lr"] == 1e-3 and config["model"]["image_size"] == 64


def test_last_pt_every_checkpoint_minutes_and_at_the_end_best_pt_weights_only(demo_dirs, tmp_path,
                                                                             monkeypatch):
    written = []
    real_save = epoch_loop.save_checkpoint

    def recording_save(path, ck):
        written.append((path.name, ck["epoch"]))
        return real_save(path, ck)

    monkeypatch.setattr(epoch_loop, "save_checkpoint", recording_save)
    train.main(_argv(demo_dirs, tmp_path / "rare", 3))  # default: every 5 minutes, and when it stops
    assert [e for name, e in written if name == "last.pt"] == [3]
    best_epochs = [e for name, e in written if name == "best.pt"]
    assert best_epochs and best_epochs[0] == 1
    best = load_checkpoint(tmp_path / "rare" / "best.pt")
    assert "optimizer" not in best and best["epoch"] == best_epochs[-1]
    assert {"model", "model_config", "text_config", "train_config", "best_metric", "metrics"} <= best.keys()

    written.clear()
    train.main(_argv(demo_dirs, tmp_path / "every", 3, "--checkpoint-minutes", "0"))
    assert [e for name, e in written if name == "last.pt"] == [1, 2, 3]


def test_compile_traces_the_training_step_and_keeps_plain_checkpoints(demo_dirs, tmp_path, monkeypatch):
    from datasets.cached import SegmentationSet

    compiled = []
    real_compile = torch.compile

    def dynamo_only(model, **kwargs):  # dynamo's graph capture for real, no code generation (minutes on CPU)
        compiled.append(model)
        return real_compile(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", dynamo_only)
    torch._dynamo.reset()
    try:
        train.main(_argv(demo_dirs, tmp_path / "c", 1, "--compile", "--max-steps-per-epoch", "0"))
    finally:
        torch._dynamo.reset()
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)
    (row,) = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    n_train = len(SegmentationSet(demo_dirs / "cache", "train"))
    assert n_train % 4 and row["steps"] == n_train // 4  # the partial batch is dropped: one shape
    assert math.isfinite(row["train_loss"])
    best = load_checkpoint(tmp_path / "c" / "best.pt")
    assert not any(k.startswith("_orig_mod.") for k in best["model"])  # the raw model's names


def test_interrupted_save_leaves_the_previous_checkpoint(demo_dirs, tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", {"model": {"w": torch.arange(4.0)}, "epoch": 1})

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"model": {"w": torch.zeros(4)}, "epoch": 2})
    monkeypatch.undo()
    old = load_checkpoint(path)
    assert old["epoch"] == 1 and torch.equal(old["model"]["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_ctrl_c_saves_last_and_out_of_memory_explains(demo_dirs, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(epoch_loop, "train_one_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train.main(_argv(demo_dirs, tmp_path / "int", 3))
    ck = load_checkpoint(tmp_path / "int" / "last.pt")
    assert ck["interrupted"] and ck["epoch"] == 0

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(epoch_loop, "train_one_epoch", oom)
    with pytest.raises(SystemExit, match="--batch-size.*--amp bf16"):
        train.main(_argv(demo_dirs, tmp_path / "oom", 1))


def test_time_limit_cuts_the_epoch_and_stops(demo_dirs, tmp_path):
    # The deadline (60 µs) has passed before training starts: one step, validation, then stop.
    result = train.main(_argv(demo_dirs, tmp_path / "t", 5, "--time-limit", "1e-6",
                              "--max-steps-per-epoch", "0"))
    rows = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in rows] == [1]
    assert result["best_epoch"] == 1 and load_checkpoint(tmp_path / "t" / "last.pt")["epoch"] == 1


def test_snapshot_steps_keep_the_weights_at_those_steps(demo_dirs, tmp_path):
    train.main(_argv(demo_dirs, tmp_path / "s", 3, "--snapshot-steps", "2,5"))
    rows = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [r["total_steps"] for r in rows] == [2, 4, 6]
    assert sorted(p.name for p in (tmp_path / "s").glob("step*.pt")) == ["step2.pt", "step5.pt"]
    # step5.pt: the end of the epoch that reached step 5 (epoch 3, 6 steps)
    assert load_checkpoint(tmp_path / "s" / "step5.pt")["metrics"]["total_steps"] == 6
    # step2.pt holds the weights a 1-epoch run of the same seed ends with
    train.main(_argv(demo_dirs, tmp_path / "one", 1))
    _states_equal(load_checkpoint(tmp_path / "s" / "step2.pt")["model"],
                  load_checkpoint(tmp_path / "one" / "last.pt")["model"])


def test_cosine_time_decays_over_the_time_limit(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(train.time, "time", lambda: clock[0])
    w = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.Adam([{"params": w[:1]}, {"params": w[1:], "lr": 1e-4}], lr=1e-3)
    cfg = TrainConfig(lr_schedule="cosine-time", time_limit=10.0, min_lr=1e-5)
    scheduler = make_scheduler(optimizer, cfg, start=1000.0)
    for elapsed_min in (0.0, 2.5, 5.0, 10.0, 12.0):
        clock[0] = 1000.0 + 60 * elapsed_min
        optimizer.step()  # no gradients: nothing moves
        scheduler.step()
        share = min(1.0, elapsed_min / 10)
        for group, base in zip(optimizer.param_groups, (1e-3, 1e-4)):
            want = 1e-5 + (base - 1e-5) * (1 + math.cos(math.pi * share)) / 2
            assert group["lr"] == pytest.approx(want, rel=1e-9)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)  # the floor once time is up
    with pytest.raises(ValueError, match="--time-limit"):
        _resolve(["--dataset", "qata", "--lr-schedule", "cosine-time"])
    assert _resolve(["--lr-schedule", "cosine-time", "--time-limit", "20"])[0].time_limit == 20


def test_text_lr_puts_the_text_encoder_in_its_own_adam_group():
    from tmc.config import tiny_config
    from tmc.model import build_model

    torch.manual_seed(0)
    model = build_model(tiny_config(image_size=32))
    text = {id(p) for p in model.text.parameters()}
    assert len(parameter_groups(model, TrainConfig(lr=1e-3))) == 1  # text_lr 0: one lr for all
    groups = parameter_groups(model, TrainConfig(lr=0.0, text_lr=0.5))
    assert {id(p) for p in groups[0]["params"]}.isdisjoint(text)
    assert {id(p) for p in groups[1]["params"]} == text and groups[1]["lr"] == 0.5
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # One Adam step at lr 0 for the rest: only the text encoder moves.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(groups, lr=0.0)
    tokens = model.tokenize(["Unilateral pulmonary infection, one infected area, upper left lung."] * 2)
    out = model(torch.rand(2, 1, 32, 32), tokens["input_ids"], tokens["attention_mask"])
    # MCM's image path starts at zero, so at step 0 only the alignment heads read the text.
    (out["logits"].square().mean() + sum(a["txt"].sum() for a in out["alignment"])).backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith("text.") for n in moved)
    assert _resolve(["--text-lr", "3e-5"])[0].text_lr == 3e-5
    # A frozen encoder has nothing to put in the group.
    frozen = build_model(tiny_config(image_size=32, freeze_text=True))
    assert len(parameter_groups(frozen, TrainConfig(text_lr=0.5))) == 1


def test_every_experiment_variant_is_valid_train_flags():
    from lab import experiments

    grids = [experiments.DEMO_VARIANTS, experiments.DEMO96_VARIANTS, experiments.DEMO_LONG_VARIANTS,
             experiments.DEMO_TEXT_ENCODER_VARIANTS]
    for variants in grids:
        for name, flags in variants.items():
            _resolve(["--dataset", "demo", *experiments.DEMO_BUDGET, *flags])  # argparse exits on a typo
    cfg, model = _resolve(["--dataset", "demo", *experiments.DEMO_TEXT_ENCODER_VARIANTS["minilm-clip"]])
    assert (model.text_model, cfg.text_lr, cfg.grad_clip, cfg.lr) == ("minilm", 3e-5, 1.0, 1e-3)


def test_the_demo_preset_sets_model_fields_and_explicit_flags_win():
    cfg, model = _resolve(["--dataset", "demo"])
    assert cfg.preset == "demo" and model == get_config("tiny", text_model="minilm", freeze_text=True,
                                                        mcm_attention="sigmoid")
    assert (model.text_model, model.freeze_text, model.mcm_attention) == ("minilm", True, "sigmoid")
    assert (cfg.batch_size, cfg.epochs, cfg.lr_schedule, cfg.max_steps_per_epoch, cfg.time_limit) == (
        16, 40, "cosine", 0, 0.0)
    _, model = _resolve(["--dataset", "demo", "--text-model", "random:2x64", "--no-freeze-text",
                         "--mcm-attention", "softmax"])
    assert (model.text_model, model.freeze_text, model.mcm_attention) == ("random:2x64", False, "softmax")
    _, qata = _resolve(["--dataset", "qata"])  # other datasets keep their preset's model
    assert (qata.text_model, qata.freeze_text, qata.mcm_attention) == ("bert-base-uncased", False, "softmax")


def test_cosine_schedule_decays_to_min_lr_over_the_epochs():
    params = [torch.nn.Parameter(torch.zeros(1))]
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5, epochs=4, lr_schedule="cosine")
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    scheduler = make_scheduler(optimizer, cfg)
    seen = []
    for _ in range(cfg.epochs):
        optimizer.step()
        scheduler.step()
        seen.append(optimizer.param_groups[0]["lr"])
    expected = [1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(1, 5)]
    assert seen == pytest.approx(expected) and seen[-1] == pytest.approx(1e-5)
    plateau = make_scheduler(torch.optim.Adam(params, lr=1e-3), TrainConfig())
    assert isinstance(plateau, torch.optim.lr_scheduler.ReduceLROnPlateau)

# ---------------------------------------------------------------------------- runs that keep their work

def test_a_fresh_run_into_a_folder_holding_a_run_is_refused(demo_dirs, tmp_path):
    train.main(_argv(demo_dirs, tmp_path / "a", 1))
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    (tmp_path / "a" / "last.pt").unlink()  # even without last.pt: best.pt and metrics.jsonl are a run
    with pytest.raises(SystemExit, match=r"already holds files \(best.pt, config.json.*--resume.*--out"):
        train.main(_argv(demo_dirs, tmp_path / "a", 1))
    after = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    assert after == {k: v for k, v in before.items() if k != "last.pt"}  # nothing rewritten
    (tmp_path / "empty").mkdir()
    train.main(_argv(demo_dirs, tmp_path / "empty", 1))  # an empty folder is fine


def test_sigterm_saves_last_pt_like_ctrl_c(demo_dirs, tmp_path, monkeypatch):
    import signal

    received = []
    previous = signal.signal(signal.SIGTERM, lambda *a: received.append(a))  # the old code's fate
    try:
        def terminate(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            return {}

        monkeypatch.setattr(epoch_loop, "train_one_epoch", terminate)
        with pytest.raises(KeyboardInterrupt):
            train.main(_argv(demo_dirs, tmp_path / "term", 3))
        ck = load_checkpoint(tmp_path / "term" / "last.pt")
        assert ck["interrupted"] and ck["epoch"] == 0 and not received
        assert signal.getsignal(signal.SIGTERM) is not train._raise_terminated  # handler put back
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_resume_refuses_another_runs_last_pt_and_identity_flags(demo_dirs, tmp_path):
    train.main(_argv(demo_dirs, tmp_path / "a", 1))
    train.main(_argv(demo_dirs, tmp_path / "b", 1, "--seed", "1"))
    with pytest.raises(SystemExit, match=r"--preset 'paper' \(the run has 'demo'\)"):
        train.main(["--out", str(tmp_path / "a"), "--resume", "--preset", "paper"])
    with pytest.raises(SystemExit, match=r"--dataset 'qata' \(the run has 'demo'\)"):
        train.main(["--out", str(tmp_path / "a"), "--resume", "--dataset", "qata"])
    os.replace(tmp_path / "b" / "last.pt", tmp_path / "a" / "last.pt")
    with pytest.raises(SystemExit, match=r"does not belong to the run .*seed: config.json 0, last.pt 1"):
        train.main(["--out", str(tmp_path / "a"), "--resume", "--epochs", "2"])


def test_resume_removes_dead_writers_temporaries_and_duplicate_epochs(demo_dirs, tmp_path):
    out = tmp_path / "r"
    train.main(_argv(demo_dirs, out, 1))
    with open(out / "metrics.jsonl", "a") as f:  # epoch 2 logged, then kill -9 before last.pt
        f.write(json.dumps({"epoch": 2, "train_loss": 9.0}) + "\n" + '{"epoch": 3, "trai')
    dead = out / ".last.pt.99999999.k3j2h1g0.tmp"  # no such pid
    dead.write_bytes(b"x" * 100)
    live = out / f".last.pt.{os.getpid()}.a1b2c3d4.tmp"  # a save still in progress
    live.write_bytes(b"x")
    train.main(["--out", str(out), "--resume", "--epochs", "2", "--no-progress"])
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert not dead.exists() and live.exists()


def test_a_killed_cache_build_leaves_no_temporary_folder(tmp_path):
    from datasets.registry import prepare

    cache = tmp_path / "cache"
    orphan = tmp_path / ".cache.tmp-99999999"
    (orphan / "x").mkdir(parents=True)
    prepare("demo", tmp_path / "demo", image_size=32, cache_dir=cache, progress=False, n=12)
    assert not orphan.exists() and (cache / "meta.json").is_file()


@pytest.mark.parametrize("content, what", [
    (b"", "an empty file"),
    (b"not a checkpoint at all" * 10, "not a TMC checkpoint"),
    (None, "not a TMC checkpoint"),  # a real checkpoint cut in half
    ({"state": torch.zeros(2)}, r"a dict without \['model', 'model_config'\]"),
    ([1, 2], "holds a list"),
])
def test_one_checkpoint_message_for_files_that_are_not_checkpoints(tmp_path, content, what):
    from tmc.checkpoint import MODEL_KEYS, CheckpointError

    path = tmp_path / "best.pt"
    if content is None:
        save_checkpoint(path, {"model": {"w": torch.zeros(1000)}, "model_config": {}})
        path.write_bytes(path.read_bytes()[:2000])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=f"{path}: {what}") as e:
        load_checkpoint(path, require=MODEL_KEYS)
    assert "weights_only" not in str(e.value) and "best.pt or last.pt" in str(e.value)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "100"], r"--image-size 100 is not a multiple of 32.*fix: --image-size 96 or 128"),
    (["--batch-size", "0"], r"--batch-size 0: expected at least 1"),
    (["--lr", "-0.001"], r"--lr -0.001: expected a finite value >= 0"),
    (["--lr", "nan"], r"--lr nan: expected a finite value >= 0"),
    (["--dataset", "qata", "--root", "", "--reader-options", ""], r"--dataset qata needs its data: --root PATH"),
    (["--epochs", "0"], r"--epochs 0: expected at least 1"),
    (["--caption-pool", "0"], r"--caption-pool 0: expected at least 1"),
    (["--caption-dropout", "1.5"], r"--caption-dropout 1.5: expected a share in \[0, 1\]"),
    (["--caption-keep", "nan"], r"--caption-keep nan: expected a share in \[0, 1\]"),
    (["--reader-options", "n=24,sise=64"], r"demo has no setting sise; valid: n, size, seed"),
])
def test_bad_flags_stop_before_any_work(tmp_path, flags, message):
    argv = _argv(tmp_path, tmp_path / "out", 1) + flags  # later flags win
    with pytest.raises(SystemExit, match=message):
        train.main(argv)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_device_cuda_without_cuda_is_a_message(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"--device cuda: CUDA is not available here; fix: --device cpu"):
        train.main(_argv(tmp_path, tmp_path / "out", 1) + ["--device", "cuda"])


def test_amp_auto_resolves_per_device_and_says_what_it_ignores(monkeypatch):
    from tmc.precision import resolve_amp

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert TrainConfig().amp == "auto" and resolve_amp("auto", cpu)[0] == "off"
    amp, note = resolve_amp("bf16", cpu)
    assert amp == "off" and "--amp bf16 is ignored on cpu" in note
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_amp("auto", gpu)[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_amp("auto", gpu)[0] == "fp16" and resolve_amp("off", gpu)[0] == "off"


def test_workers_default_to_the_cores_available_and_the_run_says_so(demo_dirs, tmp_path, monkeypatch,
                                                                   capsys):
    from tmc import engine

    monkeypatch.setattr(engine.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert TrainConfig().workers == -1 and engine.default_workers() == 2
    monkeypatch.setattr(engine.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert engine.default_workers() == 4
    monkeypatch.setattr(train, "default_workers", lambda: 0)  # keep this run in one process
    argv = _argv(demo_dirs, tmp_path / "w", 1)
    i = argv.index("--workers")
    del argv[i:i + 2]  # the demo's own default is 0: ask for the general default
    argv += ["--workers", "-1"]
    train.main(argv)
    out = capsys.readouterr().out
    assert "workers: 0 (the CPU cores available, at most 4" in out and "amp: off" in out
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    assert config["train"]["workers"] == 0 and config["train"]["amp"] == "off"
