"""Build a dataset's cache on its own and print where it is.

    python -m datasets.prepare --dataset qata --root data/QaTa-COV19
    python -m datasets.prepare --dataset qata --root data/qata --split-mode layout --skip-bad
    python -m datasets.prepare --dataset csv --root my_data.csv --option text_from_mask=true
    python -m datasets.prepare --dataset demo                     # generates <repo>/data/demo

Exit status 2 with the message on a DatasetError (a problem with the files: the message names the
file and the fix).
"""
from __future__ import annotations

import argparse
import sys

from datasets.cache import SPLIT_MODES
from datasets.records import DatasetError
from datasets.registry import DATASETS, prepare


def _option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value (e.g. layout=kaggle)")
    key, value = (s.strip() for s in text.split("=", 1))
    for conv in (int, float):
        try:
            return key, conv(value)
        except ValueError:
            pass
    return key, value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m datasets.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    p.add_argument("--root", default="", help="dataset folder (csv: the CSV file; demo: optional)")
    p.add_argument("--image-size", type=int, default=224, help="side of the cached images (224)")
    p.add_argument("--split-mode", choices=("auto", *SPLIT_MODES), default="auto",
                   help="paper: patient-level 7:1:2; layout: the folders' own split; layout-val: "
                        "the layout's held-out split as test, val carved from its train split; auto: "
                        "layout for data with a split the user wrote (a CSV's split column), else paper")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--cache-dir", default="", help="cache folder (default <repo>/cache/<name>-<hash> "
                                                   "or $TMC_CACHE/<name>-<hash>)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad files and list them")
    p.add_argument("--option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="reader setting, repeatable (layout=kaggle, text_from_mask=true, ...)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        path = prepare(args.dataset, args.root or None, image_size=args.image_size,
                       cache_dir=args.cache_dir or None, split_mode=args.split_mode,
                       seed=args.seed, skip_bad=args.skip_bad, progress=not args.no_progress,
                       **dict(args.option))
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        for note in getattr(e, "__notes__", []):
            print(note, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no cache was written (its temporary folder is removed, an earlier cache "
              "is kept); run the same command again to build it", file=sys.stderr)
        return 130
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
