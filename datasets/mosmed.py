"""MosMedData readers: the COVID19_1110 CT volumes (NIfTI) and the 2D "MosMedData+" slices.

Shape key: `X, Y, Z` RAS+ volume axes, `H, W` image rows/columns (see datasets/volumes.py).

COVID19_1110 (`MosmedReader`), choices the paper leaves open:
- Layout: `studies/CT-k/study_XXXX.nii[.gz]` and `masks/study_XXXX_mask.nii[.gz]`; `CT-k` folders
  are found at any depth under the root (users often flatten `studies/`). The severity grade is
  read only from the `CT-k` folder name; the study id from the file name.
- Only 50 studies have lesion masks, all in CT-1 (study_0255 … study_0304). They give the
  positive volumes (every axial slice, with or without lesion). CT-0 studies are the negatives
  with empty masks, as in the paper (§4.1). CT-1..4 studies without a mask have lesions but no
  labels, so they cannot be used for segmentation: they are skipped, with a one-line summary.
  The paper's 1000-case, CT-1..4-stratified split is therefore not reproducible from the public
  masks: cases are the 50 masked CT-1 studies + the CT-0 studies.
- Negatives: `negative_slices=10` axial slices per CT-0 study, at the centres of 10 equal bins
  along z (deterministic, no RNG, spread from apex to base); `"all"` takes every slice. The
  default keeps empty CT-0 slices roughly as many as the slices of the masked studies.
- Intensity: HU clipped to `window=(-1350, 150)` (lung window W1500/L-600) and scaled to [0, 1].
- Orientation: image and mask are reoriented together to RAS+ and must then share one grid;
  slice k = volume[:, :, k], shown radiologically (`axial_slice_to_image`).
- Masks are binarised with `> 0.5`. case = study id (all slices of a study stay in one split),
  stratum = the `CT-k` grade (disease status and severity), text = None (the cache builder
  writes the caption from the mask).

MosMedData+ (`MosmedPlusReader`):
- Layouts: `frames/<name>.png` + `masks/<name>.png` (same names), or LViT's
  `{Train,Val,Test}_Folder/{img,labelcol}` with text workbooks (`Image`, `Description` columns,
  keys = image names without `mask_`, with or without extension).
- case = study prefix: the name without its trailing `_<slice>` (`Morozov_study_XXXX`,
  `Jun_coronacases_caseN`, `Jun_radiopaedia_..._caseN`); each `bjorke_N` is its own case.
  Re-splitting on it keeps every study in one split (LViT's own split is slice-level).
- stratum = the source family (`Morozov`, `Jun_coronacases`, `Jun_radiopaedia`, `bjorke`).
- Files are read with datasets/images.py (`read_image`, `read_mask`: the same rules as QaTa).
- Bad files (unreadable, image/mask size mismatch) are *yielded* as DatasetError, so the cache
  builder can stop or skip them (skip_bad); the volume reader does the same per study.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from datasets.images import RASTER_SUFFIXES, image_key, read_image, read_mask
from datasets.records import DatasetError, Sample
from datasets.tables import header_names, read_table
from datasets.intensity import LUNG_WINDOW, as_range, window
from datasets.volumes import axial_slice_to_image, read_nifti, read_nifti_pair, spread_indices

_NIFTI = re.compile(r"^(?P<id>.+?)\.nii(\.gz)?$", re.IGNORECASE)
_GRADE = re.compile(r"^CT-\d$", re.IGNORECASE)
_SPLIT_FOLDERS = {"train_folder": "train", "val_folder": "val", "test_folder": "test"}


# ---------------------------------------------------------------- helpers
def _nifti_id(path: Path) -> str | None:
    m = _NIFTI.match(path.name)
    return m.group("id") if m else None


def mosmedplus_case(stem: str) -> str:
    """Study id of a MosMedData+ slice name: drop the trailing `_<slice>`; `bjorke_N` stays whole."""
    if stem.lower().startswith("bjorke_"):
        return stem
    m = re.match(r"^(.*)_\d+$", stem)
    return m.group(1) if m else stem


def mosmedplus_family(stem: str) -> str:
    """Source family used as stratum: Morozov (MosMed), Jun_coronacases, Jun_radiopaedia, bjorke."""
    low = stem.lower()
    for family in ("Morozov", "Jun_coronacases", "Jun_radiopaedia", "bjorke"):
        if low.startswith(family.lower()):
            return family
    return stem.split("_")[0]


def read_text_workbook(path: Path) -> dict[str, str]:
    """LViT-style workbook: header row with `Image` and `Description` → {normalised key: text}."""
    rows = read_table(path)
    for h, row in enumerate(rows[:5]):
        names = header_names(row)
        if "image" in names and "description" in names:
            i, d = names.index("image"), names.index("description")
            return {image_key(str(r[i])): str(r[d]).strip() for r in rows[h + 1:]
                    if r and r[i] is not None and r[d] not in (None, "")}
    raise DatasetError(f"{path}: no header row with 'Image' and 'Description' columns; fix: name "
                       "the key column 'Image' and the text column 'Description'")


# ---------------------------------------------------------------- COVID19_1110 volumes
class MosmedReader:
    """COVID19_1110 CT volumes → one Sample per axial slice (see the module docstring).

    Args:
        root: folder holding the `CT-k` folders (at any depth) and `masks/`.
        window: HU window (lo, hi) mapped to [0, 1]; default lung window W1500/L-600.
        include_negatives: use CT-0 studies as negatives with empty masks.
        negative_slices: slices per CT-0 study (evenly spread along z) or "all".
    """

    name = "mosmed"

    def __init__(self, root, window: tuple[float, float] = LUNG_WINDOW,
                 include_negatives: bool = True, negative_slices: int | str = 10):
        self.root = Path(root)
        self.window = as_range(window, "window")
        self.include_negatives = bool(include_negatives)
        if not (negative_slices == "all" or (isinstance(negative_slices, int) and negative_slices > 0)):
            raise ValueError(f"negative_slices={negative_slices!r}: expected a positive int or 'all'")
        self.negative_slices = negative_slices
        self.studies = self._plan()  # [(study id, grade, image path, mask path | None)]

    def _plan(self) -> list[tuple[str, str, Path, Path | None]]:
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: MosMed root not found; fix: pass the COVID19_1110 folder")
        studies: dict[str, tuple[str, Path]] = {}
        grade_dirs = sorted(d for d in self.root.rglob("*") if d.is_dir() and _GRADE.match(d.name))
        for grade_dir in grade_dirs:
            for f in sorted(p for p in grade_dir.rglob("*") if p.is_file()):
                sid = _nifti_id(f)
                if sid is None or sid.lower().endswith("_mask"):
                    continue
                if sid in studies:
                    raise DatasetError(f"{studies[sid][1]} and {f}: study {sid} found twice; fix: "
                                       "keep one copy")
                studies[sid] = (grade_dir.name.upper(), f)
        if not studies:
            raise DatasetError(f"{self.root}: no CT-0..CT-4 folders with study_XXXX.nii.gz files; "
                               "fix: pass the COVID19_1110 folder (holding studies/CT-k/)")
        masks: dict[str, Path] = {}
        for f in sorted(p for p in self.root.rglob("*_mask.nii*") if p.is_file()):
            sid = _nifti_id(f)[: -len("_mask")]
            if sid in masks:
                raise DatasetError(f"{masks[sid]} and {f}: two masks for {sid}; fix: keep one")
            masks[sid] = f
        if not masks:
            raise DatasetError(f"{self.root}: no masks/study_XXXX_mask.nii.gz found; the 50 lesion "
                               "masks are needed for segmentation; fix: extract masks/ next to studies/")
        plan, skipped = [], {}
        for sid, (grade, path) in sorted(studies.items()):
            if sid in masks:
                plan.append((sid, grade, path, masks[sid]))
            elif grade == "CT-0":
                if self.include_negatives:
                    plan.append((sid, grade, path, None))
            else:
                skipped[grade] = skipped.get(grade, 0) + 1
        orphans = sorted(set(masks) - set(studies))
        masked = [s for s in plan if s[3] is not None]
        grades = sorted({s[1] for s in masked})
        ids = [s[0] for s in masked]
        self.summary = (f"MosMed: {len(masked)} studies with lesion masks ({', '.join(grades)}: "
                        f"{ids[0]}..{ids[-1]})" if masked else "MosMed: no study has a mask")
        self.summary += f", {len(plan) - len(masked)} CT-0 negatives"
        if skipped:
            parts = ", ".join(f"{n} {g}" for g, n in sorted(skipped.items()))
            self.summary += (f"; skipped {parts} studies without a lesion mask (they have lesions "
                             "but no labels, so cannot train or test segmentation)")
        warnings.warn(self.summary, stacklevel=2)
        if orphans:
            warnings.warn(f"MosMed: {len(orphans)} masks without a study ({', '.join(orphans[:5])}"
                          f"{'...' if len(orphans) > 5 else ''}) under {self.root}; they are ignored",
                          stacklevel=2)
        if not masked:
            raise DatasetError(f"{self.root}: none of the masks matches a study file; fix: keep the "
                               "names study_XXXX.nii.gz / study_XXXX_mask.nii.gz")
        return plan

    def sources(self) -> list[Path]:
        return sorted(p for s in self.studies for p in (s[2], s[3]) if p is not None)

    def options(self) -> dict:
        return {"window": list(self.window), "include_negatives": self.include_negatives,
                "negative_slices": self.negative_slices}

    def __len__(self) -> int:
        return len(self.studies)

    def __iter__(self) -> Iterator[Sample]:
        for sid, grade, image_path, mask_path in self.studies:
            try:
                if mask_path is None:
                    hu, _ = read_nifti(image_path)
                    mask = np.zeros(hu.shape, dtype=bool)
                    n = hu.shape[2]
                    slices = spread_indices(n, n if self.negative_slices == "all" else self.negative_slices)
                    source = str(image_path)
                else:
                    hu, mask, _ = read_nifti_pair(image_path, mask_path)
                    slices = range(hu.shape[2])
                    source = f"{image_path}|{mask_path}"
            except DatasetError as e:
                yield e  # a bad volume: the cache builder stops, or skips it with skip_bad=True
                continue
            vol = window(hu, *self.window)  # (X, Y, Z) in [0, 1]
            for k in slices:
                yield Sample(key=f"{sid}#{k:03d}", image=axial_slice_to_image(vol[:, :, k]),
                             mask=axial_slice_to_image(mask[:, :, k]), text=None, case=sid,
                             split=None, stratum=grade, slice_index=int(k), source=source)


# ---------------------------------------------------------------- MosMedData+ 2D slices
class MosmedPlusReader:
    """MosMedData+ 2D slices (frames/masks or LViT folders) → one Sample per image.

    Args:
        root: folder holding `frames/` + `masks/`, or `Train_Folder/`, `Val_Folder/`, `Test_Folder/`.
        layout: "auto", "frames" or "lvit".
        text_files: extra workbooks (`Image`, `Description`) to read text from.
    """

    name = "mosmedplus"

    def __init__(self, root, layout: str = "auto", text_files=None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: MosMedData+ root not found; fix: pass the folder with "
                               "frames/ and masks/ or the LViT Train/Val/Test_Folder")
        if layout not in ("auto", "frames", "lvit"):
            raise ValueError(f"layout={layout!r}: expected 'auto', 'frames' or 'lvit'")
        text_files = [text_files] if isinstance(text_files, (str, Path)) else (text_files or [])
        self.text_files = [Path(p) for p in text_files]
        split_dirs = {d: _SPLIT_FOLDERS[d.name.lower()] for d in self.root.iterdir()
                      if d.is_dir() and d.name.lower() in _SPLIT_FOLDERS}
        if layout == "auto":
            layout = "lvit" if split_dirs else "frames"
        self.layout = layout
        items = self._lvit(split_dirs) if layout == "lvit" else self._frames()
        self.items = items  # [(stem, image, mask, split | None, text | None)]

    def _pair(self, img_dir: Path, mask_dir: Path, split, texts, workbooks, notes) -> list:
        images = {image_key(p.name): p for p in sorted(img_dir.iterdir()) if p.suffix.lower() in RASTER_SUFFIXES}
        masks = {image_key(p.name): p for p in sorted(mask_dir.iterdir()) if p.suffix.lower() in RASTER_SUFFIXES}
        for key in sorted(set(masks) - set(images)):
            notes.append(f"mask without image: {masks[key]}")
        out = []
        for key, path in images.items():
            if key not in masks:
                notes.append(f"image without mask: {path}")
                continue
            text = texts.get(key)
            if workbooks and text is None:
                notes.append(f"no text row for {path.name}")
            out.append((path.stem, path, masks[key], split, text))
        return out

    def _texts(self, workbooks: list[Path]) -> dict[str, str]:
        texts: dict[str, str] = {}
        for wb in workbooks:
            texts.update(read_text_workbook(wb))
        return texts

    def _lvit(self, split_dirs: dict) -> list:
        if not split_dirs:
            raise DatasetError(f"{self.root}: no Train_Folder/Val_Folder/Test_Folder; fix: pass "
                               "layout='frames' or the LViT dataset folder")
        items, notes = [], []
        for d, split in sorted(split_dirs.items(), key=lambda t: ("train", "val", "test").index(t[1])):
            img_dir, mask_dir = d / "img", d / "labelcol"
            if not img_dir.is_dir() or not mask_dir.is_dir():
                raise DatasetError(f"{d}: expected img/ and labelcol/ inside; fix: keep LViT's layout")
            workbooks = sorted(d.glob("*.xlsx")) + sorted(  # also Train_text*.xlsx beside the folders
                p for p in self.root.glob("*.xlsx") if p.name.lower().startswith(split[:3]))
            workbooks += self.text_files
            items += self._pair(img_dir, mask_dir, split, self._texts(workbooks), workbooks, notes)
        return self._finish(items, notes)

    def _frames(self) -> list:
        frames = self.root / "frames"
        if not frames.is_dir():
            found = [d for d in self.root.rglob("frames") if d.is_dir() and (d.parent / "masks").is_dir()]
            if len(found) != 1:
                raise DatasetError(f"{self.root}: expected frames/ and masks/ side by side (found "
                                   f"{len(found)} such pairs); fix: pass the folder that holds them")
            frames = found[0]
        if not (frames.parent / "masks").is_dir():
            raise DatasetError(f"{frames.parent}: frames/ has no masks/ beside it; fix: extract masks/")
        workbooks = sorted(frames.parent.glob("*.xlsx")) + self.text_files
        notes: list[str] = []
        items = self._pair(frames, frames.parent / "masks", None, self._texts(workbooks), workbooks, notes)
        return self._finish(items, notes)

    def _finish(self, items: list, notes: list[str]) -> list:
        seen, out = {}, []
        for it in items:
            if it[0] in seen:
                notes.append(f"duplicate slice name {it[0]}: {seen[it[0]]} and {it[1]} (kept the first)")
                continue
            seen[it[0]] = it[1]
            out.append(it)
        if notes:
            warnings.warn(f"MosMedData+: {len(notes)} problems under {self.root}, e.g. "
                          + "; ".join(notes[:3]), stacklevel=3)
        if not out:
            raise DatasetError(f"{self.root}: no image/mask pairs found; fix: masks must share the "
                               "image file names (optionally prefixed mask_)")
        return out

    def sources(self) -> list[Path]:
        wbs = set(self.text_files) | set(self.root.glob("*.xlsx")) | set(self.root.glob("*/*.xlsx"))
        return sorted({p for it in self.items for p in it[1:3]} | wbs)

    def options(self) -> dict:
        return {"layout": self.layout, "text_files": [str(p) for p in self.text_files]}

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Sample]:
        for stem, image_path, mask_path, split, text in self.items:
            try:
                image, mask = read_image(image_path), read_mask(mask_path)
                if image.shape != mask.shape:
                    raise DatasetError(f"{image_path} and {mask_path}: image {image.shape} and mask "
                                       f"{mask.shape} differ in size; fix: pair each image with its "
                                       "own mask, or skip it with --skip-bad")
            except DatasetError as e:
                yield e  # the cache builder stops or skips (skip_bad) with this message
                continue
            yield Sample(key=stem, image=image, mask=mask, text=text, case=mosmedplus_case(stem),
                         split=split, stratum=mosmedplus_family(stem), slice_index=-1,
                         source=f"{image_path}|{mask_path}")
