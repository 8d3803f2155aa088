"""Evaluate TMC checkpoints, compare sets of runs, draw overlays, or segment one image or volume.

    python eval.py --ckpt runs/qata-s0/best.pt                       # test split of the run's dataset
    python eval.py --ckpt best.pt --dataset qata --root data/QaTa-test --split all   # another folder
    python eval.py --ckpt runs/qata-s{0,1,2}/best.pt --json res.json  # mean ± std over seeds (Table 1)
    python eval.py --compare runs/tmc-s*/best.pt -- runs/nomcm-s*/best.pt   # paired t-test per case
    python eval.py --ckpt best.pt --save-overlays figs/               # contours + attention heatmaps
    python eval.py --ckpt best.pt --image cxr.png --text "Bilateral pulmonary infection." --out m.png
    python eval.py --ckpt best.pt --volume ct.nii.gz --text "..." --out mask.nii.gz

Metrics (threshold 0.5 on the sigmoid, at the model's input size), reported three ways:
  per image  mean over images of each image's Dice/IoU (LViT's protocol; "dice"/"miou" for 2D sets)
  global     Dice/IoU of tp/fp/fn summed over all pixels of the split (GuideDecoder's protocol)
  per case   slices → per-case mean → mean over cases (the paper's §4.3; "dice"/"miou" for volumes)
Which images: the run's own folder is split as in training (--split test: its test images). Any
other --root/--dataset keeps that folder's own split (--split-mode layout; a folder holding only a
test split is fine); --split-mode paper re-splits it 7:1:2; --split all scores every image. Each
result says "N of M images of the folder".
Empty-vs-empty (tmc.metrics): 1.0 by default, so normal CT scans enter the per-case mean and the
paired t-test (paper §4.3); --empty nan leaves such images out (nnU-Net), --empty 0 is LViT's.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import typing
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datasets.cached import SegmentationSet, load_index
from datasets.loaders import eval_loader
from datasets.predict_files import predict_image, predict_volume, volume_reading
from datasets.registry import check_reader_options, parse_reader_options, prepare
from tmc.checkpoint import MODEL_KEYS, CheckpointError, load_checkpoint, model_from_checkpoint
from tmc.distributed import pick_device
from tmc.engine import default_workers, predict_records, summarize
from tmc.metrics import THRESHOLD, combine_runs, paired_test
from tmc.choices import AmpMode, SplitMode
from tmc.precision import resolve_amp
from tmc.predict import make_segmenter
from tmc.visualize import OverlayWriter

def fail(message: str):
    raise SystemExit(f"eval.py: {message}")


# ---------------------------------------------------------------------------- loading

def load_model(path: str | Path, device: torch.device):
    """(model in eval mode on device, ModelConfig, checkpoint dict) from a train.py checkpoint."""
    ckpt = load_checkpoint(path, map_location="cpu", require=MODEL_KEYS)
    model, cfg = model_from_checkpoint(ckpt)
    return model.to(device), cfg, ckpt


def _same_folder(a: str, b: str) -> bool:
    return (not a and not b) or (bool(a) and bool(b) and Path(a).resolve() == Path(b).resolve())


def dataset_settings(ckpt: dict, args) -> dict:
    """Dataset, root, split and cache settings: the run's own, overridden by --dataset/--root/
    --split-mode/--cache-dir/--reader-options.

    The run's own folder is split as in training (and reuses its cache). Another folder keeps its
    own split by default, allows splits that exist only partly, and gets its own cache.
    """
    tc = ckpt.get("train_config", {})
    dataset = args.dataset or tc.get("dataset")
    root = args.root or tc.get("root", "")
    own = dataset == tc.get("dataset") and _same_folder(root, tc.get("root", ""))
    run_mode = tc.get("split_mode", "paper")
    mode = args.split_mode if args.split_mode != "auto" else run_mode if own else "layout"
    as_trained = own and mode == run_mode
    return {"dataset": dataset, "root": root, "own": own, "split_mode": mode,
            "partial": not as_trained,
            "cache_dir": args.cache_dir or (tc.get("cache_dir", "") if as_trained else ""),
            # A cache the user names is read, never replaced: it may be another run's.
            "keep": ("eval.py leaves it as it is; fix: another --cache-dir (a new folder), or leave "
                     "--cache-dir out") if args.cache_dir else None,
            "seed": tc.get("split_seed", tc.get("seed", 0)), "skip_bad": tc.get("skip_bad", False),
            "reader_options": args.reader_options or (tc.get("reader_options", "")
                                                      if dataset == tc.get("dataset") else "")}


def split_loader(settings: dict, image_size: int, split: str, batch_size: int, workers: int,
                 device: torch.device, progress: bool = True) -> tuple[DataLoader, int]:
    """The loader of one split (or "all") of the folder, and how many images the folder holds."""
    if not settings["dataset"]:
        fail("the checkpoint names no dataset; fix: pass --dataset and --root")
    cache = prepare(settings["dataset"], settings["root"] or None, image_size=image_size,
                    cache_dir=settings["cache_dir"] or None, split_mode=settings["split_mode"],
                    seed=settings["seed"], skip_bad=settings["skip_bad"], progress=progress,
                    partial=settings["partial"], keep=settings["keep"],
                    **parse_reader_options(settings["reader_options"]))
    rows = load_index(cache)
    wanted = None if split == "all" else split
    if not any(wanted is None or r["split"] == wanted for r in rows):
        held = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test", None)}
        where = settings["root"] or settings["dataset"]
        fail(f"{where}: no {split} images in this folder's {settings['split_mode']} split "
             f"(train {held['train']}, val {held['val']}, test {held['test']}, without a split "
             f"{held[None]}, of {len(rows)}); fix: --split all to score every image, another "
             f"--split, or --split-mode paper|layout")
    return eval_loader(SegmentationSet(cache, wanted), batch_size, workers, device), len(rows)


# ---------------------------------------------------------------------------- evaluation

def evaluate_checkpoint(path: str, args, device: torch.device) -> tuple[dict, list[dict]]:
    """Summary (tmc.engine.summarize) and per-image records of one checkpoint on one split."""
    model, cfg, ckpt = load_model(path, device)
    settings = dataset_settings(ckpt, args)
    loader, n_folder = split_loader(settings, cfg.image_size, args.split, args.batch_size,
                                    args.workers, device, progress=not args.no_progress)
    writer = None
    if args.save_overlays:
        folder = Path(args.save_overlays)
        if len(args.ckpt_list) > 1:
            folder = folder / Path(path).parent.name
        writer = OverlayWriter(folder, model, args.max_overlays)
    attention = writer is not None and len(model.mcm) > 0
    records = predict_records(model, loader, device=device, tokenize=model.tokenize, amp=args.amp,
                              on_batch=writer, return_attention=attention,
                              desc=f"eval {Path(path).name}", progress=not args.no_progress)
    summary = summarize(records, empty=args.empty)
    summary.update(dataset=settings["dataset"], split=args.split, checkpoint=str(path),
                   epoch=ckpt.get("epoch"), root=settings["root"], split_mode=settings["split_mode"],
                   n_folder=n_folder)
    if writer is not None:
        mosaic_path = writer.finish()
        summary["overlays"] = str(writer.folder)
        print(f"overlays: {writer.written} pictures in {writer.folder}"
              + (f", mosaic {mosaic_path}" if mosaic_path else ""))
    return summary, records


def pct(x: float, s: float | None = None) -> str:
    return f"{100 * x:.2f}" + (f" ± {100 * s:.2f}" if s is not None else "")


def print_result(name: str, r: dict) -> None:
    std = r["n_runs"] > 1
    g = (lambda k: pct(r[k], r[k + "_std"] if std else None))
    unit = "cases" if r["protocol"] == "per-case" else "images"
    print(f"{name}: {r['dataset']} {r['split']} ({r['split_mode']} split) | {r['n_images']} of "
          f"{r['n_folder']} images of the folder, {r['n_cases']} cases | {r['n_runs']} run(s)")
    print(f"  Dice {g('dice')}  mIoU {g('miou')}   (paper protocol: {r['protocol']} mean over {unit})")
    print(f"  per image  Dice {g('dice_per_image')}  IoU {g('iou_per_image')}   (LViT)")
    print(f"  global     Dice {g('dice_global')}  IoU {g('iou_global')}   (GuideDecoder)")
    print(f"  per case   Dice {g('dice_per_case')}  IoU {g('iou_per_case')}   (paper §4.3, volumes)")
    print(f"  {r['empty_rule']}; threshold {THRESHOLD}; std over runs with ddof=1")


def write_case_csv(path: Path, sets: dict[str, dict]) -> None:
    """One row per case: slices, and per set the run-averaged Dice/IoU and each run's Dice."""
    first = next(iter(sets.values()))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        header = ["case", "n_slices"]
        for name, r in sets.items():
            header += [f"{name}_dice", f"{name}_iou"]
            header += [f"{name}_dice_run{k + 1}" for k in range(r["n_runs"])]
        w.writerow(header)
        for case, c in first["cases"].items():
            row = [case, c["n_slices"]]
            for r in sets.values():
                rc = r["cases"].get(case)
                row += ([f"{rc['dice']:.6f}", f"{rc['iou']:.6f}"] + [f"{d:.6f}" for d in rc["dice_runs"]]
                        if rc else [""] * (2 + r["n_runs"]))
            w.writerow(row)


def evaluate_sets(args, device: torch.device) -> dict:
    sets = {"A": args.ckpt_list}
    if args.ckpt_b_list:
        sets["B"] = args.ckpt_b_list
    results = {}
    for name, paths in sets.items():
        args.ckpt_list = paths
        results[name] = combine_runs([evaluate_checkpoint(p, args, device)[0] for p in paths])
        print_result(name if len(sets) > 1 else "result", results[name])
    summary = dict(results["A"])
    if "B" in results:
        try:
            compare = paired_test(results["A"], results["B"])
        except ValueError as err:
            fail(str(err))
        summary = {"A": results["A"], "B": results["B"], "compare": compare}
        c = summary["compare"]
        for k in ("dataset", "split", "n_images", "n_cases", "n_folder"):
            summary[k] = results["A"].get(k)
        print(f"A − B per-case Dice: mean diff {pct(c['mean_diff'])} points over {c['n_cases']} cases, "
              f"paired t = {c['t']:.3f}, p = {c['p']:.4g}" + (" (*)" if c["p"] < 0.05 else ""))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        strip = (lambda r: {k: v for k, v in r.items() if k != "cases"})
        doc = strip(summary) if "B" not in results else {**summary, "A": strip(results["A"]),
                                                         "B": strip(results["B"])}
        path.write_text(json.dumps(doc, indent=2) + "\n")
        csv_path = path.with_name(path.stem + "_cases.csv")
        write_case_csv(csv_path, results)
        print(f"wrote {path} and {csv_path}")
    return summary


# ---------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--ckpt", nargs="+", default=[],
                   help="checkpoint(s); several = runs with different seeds")
    p.add_argument("--compare", nargs="+", default=None, metavar="A.pt",
                   help="set A of runs; set B follows `--` (or --ckpt-b)")
    p.add_argument("--ckpt-b", nargs="+", default=[], help="set B for --compare / --ckpt")
    p.add_argument("--dataset", default="", help="override the run's dataset")
    p.add_argument("--root", default="", help="override the run's dataset folder")
    p.add_argument("--cache-dir", default="", help="override the run's cache folder")
    p.add_argument("--reader-options", default="", help="override the run's reader options")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                   help="which images (all = every image of the folder) [test]")
    p.add_argument("--split-mode", default="auto", choices=typing.get_args(SplitMode),
                   help="auto: the run's split on its own folder, the folder's own split (layout) "
                        "on another; paper: re-split 7:1:2 by patient [auto]")
    p.add_argument("--empty", default="1", choices=("1", "nan", "0"),
                   help="score of an empty-vs-empty image (see the description) [1]")
    p.add_argument("--json", default="", help="write the summary here (and <stem>_cases.csv beside it)")
    p.add_argument("--save-overlays", default="", metavar="DIR", help="contour + attention pictures")
    p.add_argument("--max-overlays", type=int, default=32, help="pictures per checkpoint (0 = all)")
    p.add_argument("--image", default="", help="segment one image file (PNG/JPEG/TIFF/DICOM)")
    p.add_argument("--volume", default="", help="segment a NIfTI file or a DICOM series folder")
    p.add_argument("--series-uid", default=None, help="which DICOM series when the folder holds several")
    p.add_argument("--intensity", default="auto", choices=("auto", "ct", "mr", "minmax"),
                   help="volume → [0, 1] (auto: from the run's dataset: MosMed ct, Duke mr)")
    p.add_argument("--text", default="", help="the caption for --image / --volume (none or \"\": "
                                              "no caption, the mask from the image alone)")
    p.add_argument("--out", default="", help="output mask for --image (.png) / --volume (.nii.gz)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=-1,
                   help="DataLoader workers (-1 = the CPU cores available, at most 4)")
    p.add_argument("--device", default="", help="cpu, cuda, cuda:1 ('' = cuda when available)")
    p.add_argument("--amp", default="auto", choices=typing.get_args(AmpMode),
                   help="as train.py's: auto = bf16 where the GPU supports it, else fp16; off on CPU")
    p.add_argument("--no-progress", action="store_true")
    return p


def split_set_b(argv: list[str]) -> tuple[list[str], list[str]]:
    """`--compare A1 A2 -- B1 B2 --json x` → (argv without the B paths, [B1, B2]); options may
    follow set B."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    rest, set_b = argv[i + 1:], []
    while rest and not rest[0].startswith("--"):
        set_b.append(rest.pop(0))
    return argv[:i] + rest, set_b


def _describe_mask(path: Path) -> str:
    """'224x224 pixels, 3.1% foreground' for a PNG; shape and foreground for a NIfTI."""
    if str(path).endswith((".nii", ".nii.gz")):
        import nibabel as nib  # deferred: nibabel takes a second to load, only NIfTI masks need it

        data = np.asarray(nib.load(str(path)).dataobj)
        size = "x".join(map(str, data.shape)) + " voxels"
    else:
        data = np.asarray(Image.open(path))
        size = f"{data.shape[1]}x{data.shape[0]} pixels"
    return f"{size}, {100 * float((data > 0).mean()):.1f}% foreground"


def check_flags(args) -> None:
    """Stop on a bad flag before loading anything, naming the flag and the fix."""
    if args.image and args.volume:
        fail("--image and --volume together; fix: one of them per call")
    if args.batch_size < 1:
        fail(f"--batch-size {args.batch_size}: expected at least 1")
    if args.reader_options:
        try:
            if args.dataset:
                check_reader_options(args.dataset, parse_reader_options(args.reader_options))
            else:
                parse_reader_options(args.reader_options)
        except ValueError as e:
            fail(str(e))
    if args.image:
        if not Path(args.image).is_file():
            fail(f"--image {args.image}: no such file")
        if args.out and not args.out.lower().endswith(".png"):
            fail(f"--out {args.out}: the mask of --image is written as PNG; fix: --out NAME.png")
    if args.volume:
        path = Path(args.volume)
        nifti = path.name.lower().endswith((".nii", ".nii.gz"))
        if nifti and not path.is_file():
            fail(f"--volume {path}: NIfTI file not found")
        if not nifti and path.is_file():
            kind = "a single DICOM file" if path.suffix.lower() == ".dcm" else "not a .nii/.nii.gz file"
            fail(f"--volume {path}: {kind}; expected a NIfTI file or a DICOM series folder; fix: "
                 f"pass the folder holding the series (or --image for one 2D image)")
        if not nifti and not path.is_dir():
            fail(f"--volume {path}: no such NIfTI file or DICOM series folder")
        if args.out and not args.out.lower().endswith((".nii", ".nii.gz")):
            fail(f"--out {args.out}: the mask of --volume is written as NIfTI; fix: --out NAME.nii.gz")


def main(argv: list[str] | None = None) -> dict:
    argv, set_b = split_set_b(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    args.empty = float(args.empty)
    args.ckpt_list = list(args.ckpt)
    args.ckpt_b_list = list(args.ckpt_b) + set_b
    if args.compare is not None:
        args.ckpt_list += args.compare
        if not args.ckpt_b_list:
            fail("--compare needs a second set: --compare A1.pt A2.pt -- B1.pt B2.pt (or --ckpt-b)")
    if not args.ckpt_list:
        fail("pass --ckpt PATH (or --compare A.pt ... -- B.pt ...)")
    check_flags(args)
    if args.workers < 0:
        args.workers = default_workers()
    try:
        device = pick_device(args.device)
    except ValueError as e:
        fail(str(e))
    args.amp, amp_note = resolve_amp(args.amp, device)  # as the training run validated
    print(amp_note)

    if args.image or args.volume:
        if len(args.ckpt_list) != 1:
            fail("--image / --volume take exactly one --ckpt")
        model, cfg, ckpt = load_model(args.ckpt_list[0], device)
        if model.text is not None and not args.text.strip():
            print("no caption (--text not given): the mask comes from the image alone")
        try:
            segment = make_segmenter(model, args.text, device, args.amp)
        except ValueError as e:
            fail(str(e))
        if args.image:
            out = predict_image(args.image, segment, cfg.image_size,
                                args.out or Path(args.image).stem + "_mask.png")
        else:
            mode, window = volume_reading(ckpt.get("train_config", {}), args.intensity)
            name = Path(args.volume).name.split(".")[0]
            out = predict_volume(args.volume, segment, cfg.image_size, args.out or f"{name}_mask.nii.gz",
                                 intensity=mode, batch_size=args.batch_size, series_uid=args.series_uid,
                                 ct_window=window)
        print(f"wrote {out} ({_describe_mask(out)})")
        return {"out": str(out)}
    return evaluate_sets(args, device)


if __name__ == "__main__":
    from datasets.records import DatasetError

    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except (DatasetError, CheckpointError) as e:  # the user's files: the message says which and the fix
        sys.exit(f"eval.py: {e}")
