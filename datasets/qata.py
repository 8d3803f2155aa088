"""QaTa-COV19 chest X-rays with infection masks and LViT-style text, in any of its public layouts.

Layouts (`layout="auto"` detects which one `root` holds, at `root` or up to three folders below it;
more than one match, or none, is an error that says what was found and what was expected):

* "kaggle" (Degerli et al.'s release):
      QaTa-COV19-v2/{Train Set,Test Set}/{Images,Ground-truths}/   masks mask_<image name>
  plus LViT's workbooks anywhere under root: Train_text_for_Covid19.xlsx, Test_text_for_Covid19.xlsx
  (any .xlsx with columns Image, Description) and, optionally, Train_ID.xlsx / Val_ID.xlsx (column
  Image, no Description): the layout's own split is then train/val/test, otherwise train/test.
* "lvit" (LViT's prepared folders):
      {Train_Folder,Val_Folder,Test_Folder}/{img,labelcol}/ + any *.xlsx (Image, Description)
* "guidedecoder" (Ariadne's Thread / LanGuideMedSeg):
      {Train,Test}/{Images,GTs}/ + prompt/*.csv (Image, Description); its own train/val split is
      the first 80% / last 20% of the train CSV's rows, as in that code.
* "sgseg" (SGSeg; the layout of the shared QaTa subset):
      images/<split>/{images,masks}/ + prompts/annotation.json {split: [{image_path, caption}]}

Pairing. The masks drive it (the Kaggle Images folders hold extra images). An image, a mask and a
text row share one key: the file name without folder, in lower case, without a known image extension
and without one leading "mask_" (`datasets.images.image_key`). So "mask_covid_1.png", "mask_covid_1",
"covid_1.png" and "COVID_1" all match. Images without masks, masks without images and text rows
without images are dropped with a warning that gives their count and a few names. Text missing for a
paired image is an error for that image, unless text_from_mask=True (the cache then writes a caption
from the mask).

Patients: BIMCV-style names start with the subject id, `sub-sNNNNN` (any case). `covid_N` images carry
no subject id, so each one is its own patient (the paper's patient-level split can only group the
`sub-s` images).

Bad files are reported by yielding a DatasetError (see datasets/cache.py), so skip_bad can pass over
them.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from datasets.images import IMAGE_SUFFIXES, image_key, load_samples, read_image_and_mask
from datasets.records import DatasetError, Sample
from datasets.tables import header_names, read_table
from datasets.splits import normalise_split

__all__ = ["LAYOUTS", "patient_id", "read_text_table", "detect_layout", "QataReader"]

LAYOUTS = ("kaggle", "lvit", "guidedecoder", "sgseg")
_SUBJECT = re.compile(r"^(sub-s\d+)", re.IGNORECASE)
_MAX_DEPTH = 3


def patient_id(name: str) -> str:
    """'sub-S11596_ses-E21420_run-1_bp-chest_vp-ap_dx.png' → 'sub-s11596'; 'covid_12' → 'covid_12'."""
    key = image_key(name)
    m = _SUBJECT.match(key)
    return m.group(1).lower() if m else key


def _warn_unmatched(where: str, what: str, names: list[str]) -> None:
    if names:
        shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
        warnings.warn(f"{where}: {len(names)} {what} ({shown}); they are not used", stacklevel=3)


# ---------------------------------------------------------------------------- folders

def _subdirs(folder: Path) -> dict[str, Path]:
    """{lower-case name: path} of the visible sub-folders (scandir: no stat per file)."""
    try:
        with os.scandir(folder) as it:
            return {e.name.lower(): Path(e.path) for e in sorted(it, key=lambda e: e.name)
                    if e.is_dir() and not e.name.startswith(".")}
    except OSError:
        return {}


def _child(folder: Path | None, *names: str) -> Path | None:
    """The sub-folder of `folder` whose name matches one of `names`, ignoring case."""
    subs = _subdirs(folder) if folder is not None else {}
    return next((subs[n.lower()] for n in names if n.lower() in subs), None)


def _folders(root: Path, depth: int = _MAX_DEPTH) -> list[Path]:
    """root and its sub-folders down to `depth` levels (hidden folders skipped)."""
    out, level = [root], [root]
    for _ in range(depth):
        level = [c for d in level for c in _subdirs(d).values()]
        out += level
    return out


def _files(folder: Path, suffixes=IMAGE_SUFFIXES) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes
                  and not p.name.startswith("."))


def _find_text_files(base: Path, suffix: str) -> list[Path]:
    out = []
    for d in _folders(base):
        out += [p for p in _files(d, (suffix,)) if not p.name.startswith("~$")]  # Excel lock files
    return sorted(set(out))


def _detect_at(d: Path) -> dict[str, dict]:
    """Layouts whose folders sit directly in d, with their split → (images, masks) folders."""
    found = {}
    splits = {}
    for name in ("Train Set", "Test Set"):
        s = _child(d, name)
        if s and _child(s, "Images") and _child(s, "Ground-truths"):
            splits[name.split()[0].lower()] = (_child(s, "Images"), _child(s, "Ground-truths"))
    if splits:
        found["kaggle"] = splits
    splits = {}
    for name, split in (("Train_Folder", "train"), ("Val_Folder", "val"), ("Test_Folder", "test")):
        s = _child(d, name)
        if s and _child(s, "img") and _child(s, "labelcol"):
            splits[split] = (_child(s, "img"), _child(s, "labelcol"))
    if splits:
        found["lvit"] = splits
    splits = {}
    for name in ("Train", "Test"):
        s = _child(d, name)
        if s and _child(s, "Images") and _child(s, "GTs"):
            splits[name.lower()] = (_child(s, "Images"), _child(s, "GTs"))
    if splits and _child(d, "prompt"):
        found["guidedecoder"] = splits
    images = _child(d, "images")
    if images and _child(d, "prompts"):
        splits = {}
        for s in sorted(p for p in images.iterdir() if p.is_dir()):
            if _child(s, "images") and _child(s, "masks"):
                splits[s.name] = (_child(s, "images"), _child(s, "masks"))
        if splits:
            found["sgseg"] = splits
    return found


def detect_layout(root: Path, layout: str = "auto") -> tuple[str, Path, dict]:
    """Find the QaTa layout under root.

    Returns:
        (layout name, base folder, {split folder name: (images folder, masks folder)}).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder; expected a QaTa-COV19 dataset folder")
    if layout != "auto" and layout not in LAYOUTS:
        raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
    hits = []
    for d in _folders(root):
        for name, splits in _detect_at(d).items():
            if layout in ("auto", name):
                hits.append((name, d, splits))
    kinds = sorted({h[0] for h in hits})
    if len(kinds) == 1:
        return hits[0]
    seen = ", ".join(p.name for p in sorted(root.iterdir())[:12]) or "nothing"
    if not hits:
        want = "one of its layouts" if layout == "auto" else f"the {layout!r} layout"
        raise DatasetError(
            f"{root}: no QaTa-COV19 layout found (it holds: {seen}); expected {want}: "
            f"kaggle 'QaTa-COV19-v2/Train Set|Test Set/Images|Ground-truths', "
            f"lvit 'Train_Folder|Val_Folder|Test_Folder/img|labelcol', "
            f"guidedecoder 'Train|Test/Images|GTs + prompt/*.csv', "
            f"sgseg 'images/<split>/images|masks + prompts/annotation.json'; "
            f"fix: point --root at the folder that holds them")
    found = ", ".join(f"{name} at {d}" for name, d, _ in hits)
    raise DatasetError(f"{root}: several QaTa layouts found ({found}); expected one; fix: pass "
                       f"layout=one of {kinds} or a narrower root")


# ---------------------------------------------------------------------------- text tables

def read_text_table(path: Path) -> tuple[list[tuple[str, str | None]], bool]:
    """Rows of an LViT workbook (.xlsx) or GuideDecoder CSV.

    Returns:
        ([(Image, Description or None), ...], has_description_column).
    """
    table = read_table(path, fix="save it as an .xlsx/.csv with columns Image, Description")
    header = header_names(table[0] if table else ())
    if "image" not in header:
        raise DatasetError(f"{path}: no 'Image' column (header {table[0] if table else []}); "
                           f"expected columns Image, Description as in LViT's workbooks")
    i = header.index("image")
    j = header.index("description") if "description" in header else None
    rows = []
    for r in table[1:]:
        if i < len(r) and r[i] is not None and str(r[i]).strip():
            text = r[j] if j is not None and j < len(r) else None
            rows.append((str(r[i]).strip(), None if text is None else str(text).strip()))
    return rows, j is not None


# ---------------------------------------------------------------------------- reader

@dataclass
class _Pair:
    key: str  # normalised key
    image: Path
    mask: Path
    folder_split: str  # the split folder's name in the layout


class QataReader:
    """QaTa-COV19 in any supported layout (module docstring).

    Args:
        root: dataset folder (or a folder above it).
        layout: "auto" or one of LAYOUTS.
        text_from_mask: when an image has no text, let the cache generate a caption from its mask
            instead of reporting an error.
        text_files: extra .xlsx/.csv text tables (columns Image, Description) to use besides the
            ones the layout holds (a list, or one comma-separated string).
    """

    name = "qata"

    def __init__(self, root, layout: str = "auto", text_from_mask: bool = False,
                 text_files=None) -> None:
        self.root = Path(root).resolve()
        self.layout, self.base, split_dirs = detect_layout(self.root, layout)
        self.text_from_mask = bool(text_from_mask)
        self._problems: dict[str, str] = {}  # key → error message, reported when iterated
        self.pairs = self._pair(split_dirs)
        self.text_sources: list[Path] = []
        if isinstance(text_files, (str, Path)):  # from the command line: "a.xlsx,b.xlsx"
            text_files = [t for t in str(text_files).split(",") if t.strip()]
        self.texts, split_of = self._read_texts([Path(p).expanduser() for p in (text_files or [])])
        self.splits = {p.key: self._split(p, split_of) for p in self.pairs}
        if not self.texts and not self.text_from_mask:
            raise DatasetError(f"{self.base}: no text found for layout {self.layout!r}; expected "
                               f"{self._text_hint()}; fix: add them, pass text_files=..., or "
                               f"text_from_mask=True to derive captions from the masks")
        used = {p.key for p in self.pairs}
        _warn_unmatched(str(self.base), "text rows without an image",
                        [k for k in self.texts if k not in used])

    # -- construction helpers

    def _by_key(self, files: list[Path], what: str) -> dict[str, Path]:
        """{normalised key: file}; a second file with the same key is recorded as a problem."""
        found: dict[str, Path] = {}
        for p in files:
            k = image_key(p.name)
            if k in found:
                self._problems[k] = (f"{p}: duplicate key {k!r} (also {found[k]}); expected one "
                                     f"{what} per name; fix: remove one of them")
            found[k] = p
        return found

    def _pair(self, split_dirs: dict) -> list[_Pair]:
        pairs = []
        for folder_split, (img_dir, mask_dir) in sorted(split_dirs.items()):
            images = self._by_key(_files(img_dir), "image")
            masks = self._by_key(_files(mask_dir), "mask")
            _warn_unmatched(str(mask_dir), "masks without an image",
                            [m.name for k, m in masks.items() if k not in images])
            _warn_unmatched(str(img_dir), "images without a mask",
                            [p.name for k, p in images.items() if k not in masks])
            for k in sorted(masks):
                if k in images:
                    pairs.append(_Pair(k, images[k], masks[k], folder_split))
        seen: dict[str, _Pair] = {}
        for p in pairs:
            if p.key in seen:
                self._problems[p.key] = (f"{p.image}: duplicate key {p.key!r} (also "
                                         f"{seen[p.key].image}); expected unique image names "
                                         f"across splits")
            seen[p.key] = p
        if not pairs:
            raise DatasetError(f"{self.base}: no image/mask pairs in the {self.layout} layout; "
                               f"expected masks named like the images (optionally 'mask_' + name)")
        return pairs

    def _text_hint(self) -> str:
        return {"kaggle": "LViT's Train_text_for_Covid19.xlsx / Test_text_for_Covid19.xlsx under root",
                "lvit": "an .xlsx with columns Image, Description in the split folders",
                "guidedecoder": "prompt/train.csv and prompt/test.csv (Image, Description)",
                "sgseg": "prompts/annotation.json"}[self.layout]

    def _add_text(self, texts: dict, key: str, text, source: Path) -> None:
        if text is None or not str(text).strip():
            return
        text = str(text).strip()
        if key in texts and texts[key][0] != text:
            self._problems[key] = (f"{source}: duplicate text rows for {key!r} that disagree "
                                   f"(also {texts[key][1]}); expected one description per image")
        texts[key] = (text, source)

    def _read_texts(self, extra: list[Path]) -> tuple[dict, dict]:
        """Text per key, and per key the split given by the layout's lists (ID files, CSV order)."""
        texts: dict[str, tuple[str, Path]] = {}
        split_of: dict[str, str] = {}
        if self.layout == "sgseg":
            path = self.base / "prompts" / "annotation.json"
            if path.is_file():
                self.text_sources.append(path)
                try:
                    data = json.loads(path.read_text())
                except (OSError, ValueError) as e:
                    raise DatasetError(f"{path}: unreadable JSON ({e}); expected "
                                       f'{{"train": [{{"image_path": ..., "caption": ...}}]}}') from e
                shape = '{"train": [{"image_path": ..., "caption": ...}], "test": [...]}'
                if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
                    raise DatasetError(f"{path}: holds a JSON {type(data).__name__}; expected an "
                                       f"object of split → list of entries, {shape}; fix: group "
                                       f"the entries by split as SGSeg's annotation.json does")
                for split, entries in data.items():
                    for e in entries:
                        if not isinstance(e, dict) or "image_path" not in e:
                            raise DatasetError(f"{path}: entry without 'image_path' in {split!r}")
                        self._add_text(texts, image_key(e["image_path"]), e.get("caption"), path)
        tables = extra[:]
        if self.layout in ("kaggle", "lvit"):
            tables += _find_text_files(self.root if self.layout == "kaggle" else self.base, ".xlsx")
        elif self.layout == "guidedecoder":
            tables += _find_text_files(_child(self.base, "prompt"), ".csv")
        for path in tables:
            rows, has_text = read_text_table(path)
            self.text_sources.append(path)
            if has_text:
                for name, text in rows:
                    self._add_text(texts, image_key(name), text, path)
                if self.layout == "guidedecoder" and "train" in path.stem.lower():
                    cut = int(len(rows) * 0.8)  # GuideDecoder: first 80% train, last 20% val
                    for i, (name, _) in enumerate(rows):
                        split_of[image_key(name)] = "train" if i < cut else "val"
            else:
                stem = path.stem.lower()
                split = "val" if "val" in stem else "train" if "train" in stem else None
                if split is None:
                    warnings.warn(f"{path}: a list without Description whose name says neither "
                                  f"train nor val; ignored", stacklevel=3)
                    continue
                for name, _ in rows:
                    split_of[image_key(name)] = split
        return {k: v[0] for k, v in texts.items()}, split_of

    def _split(self, pair: _Pair, split_of: dict) -> str | None:
        folder = pair.folder_split
        if self.layout in ("kaggle", "guidedecoder") and folder == "train" and split_of:
            return split_of.get(pair.key)  # None: in no list, an error in layout mode only
        try:
            return normalise_split(folder)
        except DatasetError:
            return None

    # -- Reader protocol

    def sources(self) -> list[Path]:
        return sorted({*(p.image for p in self.pairs), *(p.mask for p in self.pairs),
                       *self.text_sources})

    def options(self) -> dict:
        return {"root": str(self.root), "layout": self.layout,
                "text_from_mask": self.text_from_mask}

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, pair: _Pair) -> Sample:
        """Read one pair (raises DatasetError naming the file)."""
        if pair.key in self._problems:
            raise DatasetError(self._problems[pair.key])
        image, mask = read_image_and_mask(pair.image, pair.mask)
        text = self.texts.get(pair.key)
        if text is None and not self.text_from_mask:
            raise DatasetError(f"{pair.image}: no text for this image (looked for "
                               f"'mask_{pair.image.name}' or '{pair.image.stem}' in "
                               f"{[p.name for p in self.text_sources] or 'no text file'}); fix: add "
                               f"its row, or pass text_from_mask=True")
        return Sample(key=pair.image.stem, image=image, mask=mask, text=text,
                      case=patient_id(pair.image.name), split=self.splits[pair.key],
                      source=str(pair.image))

    def __iter__(self):
        """Samples in mask order; a bad file is yielded as its DatasetError (datasets/cache.py)."""
        yield from load_samples(self.load, self.pairs)
