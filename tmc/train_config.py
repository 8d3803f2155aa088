"""Training settings (`TrainConfig`) and the command line generated from both config dataclasses.

Every field of `ModelConfig` (tmc/config.py) and of `TrainConfig` below becomes a flag
(`text_length` → `--text-length`), so the flags and the configs cannot drift apart. The help text
of a flag is its field's `help` metadata; the choices of a flag are its field's Literal type. Resolution order, last one wins:

    dataclass default → per-dataset default (DATASET_DEFAULTS, the paper's §4.2) → explicit flag

The model side starts from a preset (`--preset paper|tiny`; the demo defaults to tiny) and applies
the explicit model flags on top. A few ablation aliases read like the paper's tables:
`--no-text` (use_text=False), `--no-alignment` (use_alignment=False), `--mcm-stages none`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Literal

from tmc.choices import AmpMode, AugmentMode, CaptionMode, DatasetName, LrSchedule, SegLoss, SplitMode
from tmc.config import ModelConfig, PresetName, check_choices, get_config, literal_choices, option


@dataclass
class TrainConfig:
    # --- data ---
    dataset: DatasetName = option("demo", "the dataset reader (datasets/registry.py)")
    root: str = option("", 'dataset folder (csv: the CSV file); demo: "" = generated in the cache '
                           'folder')
    preset: Literal["", PresetName] = option("", 'model preset ("" = tiny for demo, paper otherwise)')
    cache_dir: str = option("", 'preprocessed cache ("" = <repo>/cache/<dataset>-<hash> or '
                                '$TMC_CACHE)')
    split_mode: SplitMode = option("auto", (
        "paper: patient-level 7:1:2 split; layout: the folders' own split; layout-val: the layout's "
        "held-out split as test, val carved by patient from its train split (1/8); auto: layout for "
        "a CSV with a split column, else paper"))
    split_seed: int = option(0, "seed of the paper split; fixed across --seed so all runs share test "
                                "cases")
    skip_bad: bool = option(False, "skip unreadable files while caching instead of stopping")
    reader_options: str = option("", "extra reader settings as key=value,key=value (e.g. "
                                     "phase=post_1)")
    augment: AugmentMode = option("paper", (
        "paper (rotation ±20°, k·90°, flips) | text-consistent (no k·90°; flips rewrite left/right, "
        "upper/lower in the caption) | none"))
    captions: CaptionMode = option("varied", (
        "varied: each training caption reworded (same facts, other words: datasets/captions.py) and "
        "a share --caption-dropout left out, so reports and no caption work | literal: the "
        "dataset's own captions (the paper)"))
    caption_dropout: float = option(0.2, "share of training captions replaced by no caption "
                                         "(--captions varied)")
    caption_keep: float = option(0.25, "share of the captioned training captions kept word for "
                                       "word (--captions varied)")
    caption_pool: int = option(24, "fixed rewordings drawn from per training caption "
                                   "(--captions varied)")
    workers: int = option(-1, "DataLoader worker processes (-1 = the CPU cores available, at most 4)")
    # --- optimisation (paper §4.2) ---
    lr: float = option(3e-4, "Adam learning rate (paper: 3e-4 QaTa/Duke, 1e-3 MosMed)")
    text_lr: float = option(0.0, (
        "Adam learning rate of the text encoder's weights (0 = lr); a pretrained BERT is usually "
        "fine-tuned near 1e-5..5e-5, far below the lr of a network trained from scratch"))
    weight_decay: float = option(0.0, "Adam L2 weight decay (the paper states none)")
    batch_size: int = option(8, "images per step (per process under torchrun)")
    eval_batch_size: int = option(0, "images per evaluation step (0 = batch_size)")
    epochs: int = option(200, "at most this many epochs")
    patience: int = option(20, "early stop after this many epochs without a validation-Dice gain")
    lr_schedule: LrSchedule = option("plateau", (
        "plateau (paper: lr x plateau_factor after plateau_patience epochs without gain) | cosine "
        "(lr to min_lr over --epochs) | cosine-time (lr to min_lr over --time-limit, for a "
        "wall-clock budget)"))
    plateau_patience: int = option(10, "ReduceLROnPlateau: epochs without gain before lr × "
                                       "plateau_factor")
    plateau_factor: float = option(0.1, "ReduceLROnPlateau factor")
    min_lr: float = option(0.0, "ReduceLROnPlateau floor")
    seg_loss: SegLoss = option("bce", "bce (paper §3.4) | bce+dice")
    alignment_weight: float = option(0.1, "λ in L = L_seg + λ·L_align (paper: 0.1)")
    grad_clip: float = option(0.0, "clip the gradient norm to this value (0 = off; the paper states "
                                   "none)")
    amp: AmpMode = option("auto", (
        "auto (bf16 where the GPU supports it, else fp16; off on CPU) | off | bf16 | fp16 (CUDA "
        "only; fp16 uses a GradScaler)"))
    compile: bool = option(False, (
        "torch.compile the model for training (minutes to compile); each epoch's last partial batch "
        "is dropped, so every step has one shape"))
    cuda_graphs: bool = option(False, (
        "record the whole training step in a CUDA graph and replay it (one GPU; drops the last "
        "partial batch)"))
    # --- run ---
    device: str = option("", '"" = cuda when available, else cpu')
    seed: int = option(0, "python, numpy, torch, loader workers and augmentation")
    out: str = option("", 'run folder ("" = runs/<dataset>-<preset>-s<seed>)')
    resume: bool = option(False, "continue from <out>/last.pt")
    max_steps_per_epoch: int = option(0, "stop each epoch after this many steps (0 = full epoch)")
    limit_eval_batches: int = option(0, "evaluate only this many batches (0 = all)")
    max_nonfinite: int = option(20, "stop after this many non-finite losses in a row")
    time_limit: float = option(0.0, "minutes of training + validation; then the run stops (0 = none)")
    # A GPU epoch of QaTa's 2000 images takes about 13 s.
    checkpoint_minutes: float = option(5.0, (
        "write last.pt (weights + Adam state: 2.5 GiB for the paper preset) at most this often, and "
        "always when the run stops; 0 = after every epoch"))
    snapshot_steps: tuple[int, ...] = option((), "step counts whose weights are also saved as "
                                                 "step<N>.pt")
    test_at_end: bool = option(True, "evaluate best.pt on the test split when training ends")
    progress: bool = option(True, "tqdm progress bar per epoch")

    def __post_init__(self) -> None:
        check_choices(self)


# The paper's settings per dataset (§4.2); anything not listed keeps the dataclass default. Departures
# from the paper are listed, with their evidence, in README.md and results/README.md.
DATASET_DEFAULTS: dict[str, dict] = {
    # demo: a few CPU minutes, the same result on any machine (no time limit); its synthetic
    # captions are the only words it is asked, so it keeps them literal
    "demo": dict(preset="demo", captions="literal", augment="text-consistent", lr=1e-3, batch_size=16, epochs=40,
                 lr_schedule="cosine", patience=40, workers=0, max_steps_per_epoch=0, time_limit=0.0,
                 seg_loss="bce+dice"),
    # qata: augmentation that keeps the captions true (tmc/augment.py)
    "qata": dict(lr=3e-4, augment="text-consistent"),
    "mosmed": dict(lr=1e-3),
    "mosmedplus": dict(lr=1e-3),  # same CT source as MosMed; the paper gives only MosMed's value
    "duke": dict(lr=3e-4),
    "csv": dict(lr=3e-4),
}

# Training settings a model preset needs on a dataset, over DATASET_DEFAULTS, each measured there:
# (qata, small) is the recipe of the QaTa-COV19 protocol (python -m lab.qata_protocol; the lr
# follows one cosine over 72 epochs of 50 steps, about the 3,600 steps 20 minutes buy on one CPU
# thread), which the text-guided model wins over the image-only one (results/README.md). It tests on
# the layout's held-out folder (QaTa-COV19's official test split) and selects on patients carved out
# of its training folder, as the protocol does.
PRESET_DEFAULTS: dict[tuple[str, str], dict] = {
    ("qata", "small"): dict(split_mode="layout-val", seg_loss="bce+dice", lr=1e-3, epochs=72,
                            max_steps_per_epoch=50, lr_schedule="cosine", patience=72, workers=0),
}

# Extra spellings that read like the paper's ablation tables: field → (on flag, off flag).
BOOL_ALIASES = {
    "use_text": ("--text", "--no-text"),
    "use_alignment": ("--alignment", "--no-alignment"),
}


# ---------------------------------------------------------------------------- flag generation

def parse_tuple(text: str, item=int) -> tuple:
    """"2,3,4" → (2, 3, 4); "none" or "" → ()."""
    text = text.strip()
    if text.lower() in ("", "none", "()"):
        return ()
    try:
        return tuple(item(t) for t in text.replace(" ", "").strip("()").split(",") if t)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__}s or 'none', "
                                         f"got {text!r}") from e


def _add_fields(parser: argparse.ArgumentParser, cls, title: str) -> list[str]:
    """Add one flag per dataclass field, default None (= not given). Returns the field names."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    choices = literal_choices(cls)
    names = []
    for f in dataclasses.fields(cls):
        names.append(f.name)
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        help_text = f"{f.metadata.get('help', '')} [default: {f.default!r}]".strip()
        if tp is bool:
            on, off = BOOL_ALIASES.get(f.name, (flag, "--no-" + flag[2:]))
            on_flags = [on] + ([flag] if flag != on else [])
            off_flags = [off] + (["--no-" + flag[2:]] if "--no-" + flag[2:] != off else [])
            group.add_argument(*on_flags, dest=f.name, action="store_const", const=True, default=None,
                               help=help_text)
            group.add_argument(*off_flags, dest=f.name, action="store_const", const=False,
                               default=None, help=f"set {f.name} to False")
        elif typing.get_origin(tp) is tuple:
            item = typing.get_args(tp)[0]
            group.add_argument(flag, dest=f.name, default=None, metavar="A,B,..|none",
                               type=lambda s, item=item: parse_tuple(s, item), help=help_text)
        elif f.name in choices:
            group.add_argument(flag, dest=f.name, default=None, choices=choices[f.name], help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=tp, default=None, help=help_text)
    return names


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The train.py parser: every TrainConfig and ModelConfig field as a flag."""
    epilog = "per-dataset defaults (paper §4.2):\n" + "\n".join(
        f"  {name:<11} {', '.join(f'{k}={v}' for k, v in d.items())}"
        for name, d in DATASET_DEFAULTS.items()) + "\n" + "\n".join(
        f"  {name} --preset {preset}: {', '.join(f'{k}={v}' for k, v in d.items())}"
        for (name, preset), d in PRESET_DEFAULTS.items())
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    train_names = _add_fields(parser, TrainConfig, "training (TrainConfig)")
    model_names = _add_fields(parser, ModelConfig, "model (ModelConfig; on top of --preset)")
    clash = set(train_names) & set(model_names)
    if clash:  # pragma: no cover - guards future edits of either dataclass
        raise RuntimeError(f"TrainConfig and ModelConfig share field names {sorted(clash)}")
    parser.set_defaults(_train_fields=train_names, _model_fields=model_names)
    return parser


# ---------------------------------------------------------------------------- resolution

def explicit_overrides(args: argparse.Namespace) -> tuple[dict, dict]:
    """The flags the user actually gave: (train overrides, model overrides)."""
    train = {k: getattr(args, k) for k in args._train_fields if getattr(args, k) is not None}
    model = {k: getattr(args, k) for k in args._model_fields if getattr(args, k) is not None}
    return train, model


def resolve_train_config(overrides: dict, base: dict | None = None) -> TrainConfig:
    """TrainConfig from defaults → per-dataset defaults → the preset's defaults on that dataset (or
    `base`, a saved config) → overrides."""
    if base is None:
        dataset = overrides.get("dataset", TrainConfig.dataset)
        if dataset not in DATASET_DEFAULTS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of "
                             f"{', '.join(typing.get_args(DatasetName))}")
        preset = overrides.get("preset") or default_preset(dataset)
        base = {**dataclasses.asdict(TrainConfig()), **DATASET_DEFAULTS[dataset],
                **PRESET_DEFAULTS.get((dataset, preset), {})}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in {**base, **overrides}.items() if k in known})
    if cfg.lr_schedule == "cosine-time" and cfg.time_limit <= 0:
        raise ValueError("--lr-schedule cosine-time decays the lr over the --time-limit budget; fix: "
                         "give --time-limit MINUTES, or use --lr-schedule cosine (over --epochs)")
    if not cfg.preset:
        cfg.preset = default_preset(cfg.dataset)
    return cfg


def default_preset(dataset: str) -> str:
    """The model preset of a run that names none: the dataset's own (the demo's), else paper."""
    return DATASET_DEFAULTS.get(dataset, {}).get("preset", "paper")


def resolve_model_config(preset: str, overrides: dict) -> ModelConfig:
    """The preset's ModelConfig, then the explicit model flags."""
    return get_config(preset, **overrides)


def check_train_config(cfg: TrainConfig) -> None:
    """ValueError naming the flag and the fix, before any work (the cache build takes minutes).
    The reader options are the dataset reader's to check (datasets.registry.check_reader_options)."""
    positive = {"batch_size": cfg.batch_size, "epochs": cfg.epochs, "caption_pool": cfg.caption_pool}
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: expected at least 1")
    for name in ("lr", "text_lr", "weight_decay", "eval_batch_size", "grad_clip", "time_limit",
                 "checkpoint_minutes", "min_lr"):
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0:  # nan < 0 is False
            raise ValueError(f"--{name.replace('_', '-')} {value}: expected a finite value >= 0")
    for name in ("caption_dropout", "caption_keep"):
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:  # also refuses nan
            raise ValueError(f"--{name.replace('_', '-')} {value}: expected a share in [0, 1]")
    if cfg.workers < -1:
        raise ValueError(f"--workers {cfg.workers}: expected a count, or -1 for the default")
