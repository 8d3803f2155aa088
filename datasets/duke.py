"""Duke-Breast-Cancer-MRI reader: one DCE phase per patient, tumour masks, axial slices.

Shape key: `X, Y, Z` RAS+ volume axes, `Co, R, S` a DICOM series' native columns, rows, slices,
`H, W` image rows/columns (see datasets/volumes.py for the orientation conventions).

Inputs, all found under `root` (explicit paths override; folder and file names case-insensitive):
- TCIA DICOM tree `.../Duke-Breast-Cancer-MRI/Breast_MRI_NNN/<study>/<series>/*.dcm`
  (NBIA descriptive or classic UID folder names; `1-001.dcm` or `1-1.dcm`; any file names).
- MAMA-MIA: `images/DUKE_NNN/DUKE_NNN_000k.nii.gz` (k = phase index: 0 pre, 1 post_1, ...) and
  `segmentations/expert/DUKE_NNN.nii.gz`. DUKE_NNN is presumed to be Breast_MRI_NNN (the same
  number; not confirmed by MAMA-MIA's documentation).
- `Breast-Cancer-MRI-filepath_filename-mapping.xlsx`, `Annotation_Boxes.xlsx`,
  `Clinical_and_Other_Features.xlsx`; a user text CSV only when passed (`text_csv`).

Choices the paper leaves open (what this reader does):
- Input phase: one DCE phase, `phase="post_1"` (first post-contrast, where tumours enhance most
  against fibroglandular tissue). With the mapping file the series is the one whose
  `original_path_and_filename.split('/')[-2]` equals the phase, identified by the SeriesInstanceUID
  in `classic_path` (`split('/')[-2]`). Without it (rule, unconfirmed on the full collection):
  dynamic series are those whose SeriesDescription matches `dyn|vibrant|ph<d>|<d>st/nd/rd/th|pass|
  pre|post` and not `sub|mip|t2|stir|seg|loc|scout|cal`; a description naming its phase wins
  (`pre` → pre; `ph1`, `1st`, `post1` → post_1, ...); the rest are ordered by AcquisitionTime
  (then SeriesTime, SeriesNumber) and fill the remaining phases in order (earliest = pre).
- Image: the DICOM series (grouped/ordered by datasets/dicom_series.py) when the patient's folder
  exists, else the MAMA-MIA image of that phase (`image_source="auto"`); clipped to its own
  0.1/99.9 percentiles and scaled to [0, 1] per volume.
- Mask: MAMA-MIA expert segmentation (`> 0.5`). When it is not on the DICOM grid after both are
  reoriented to RAS+, it is resampled onto it by nearest neighbour through the affines.
  `mask_source="boxes"` uses `Annotation_Boxes.xlsx` as box masks, only with
  `boxes_are_weak_labels=True`: boxes are not outlines. Assumed, unconfirmed: Start/End Row and
  Column are 1-based inclusive rows/columns of the stored DICOM pixel matrix; Start/End Slice are
  1-based inclusive positions in acquisition order (images ranked by InstanceNumber, the order of
  NBIA's `1-NNN.dcm` names and of the mapping file's slice number), in the selected phase's series.
- Slices: every axial slice with tumour, plus `negative_share` of the case's tumour-free slices
  (round(share × number of tumour-free slices)), taken at the centres of equal bins over them
  (deterministic, spread along z). case = `Breast_MRI_NNN` (one study per patient).
- Text: `text_csv` (columns case|patient|patient id, text|description|caption) wins; else a template
  over `Clinical_and_Other_Features.xlsx` (sheet `Data`, three header rows: category, name,
  legend; names stripped):
      "<Left|Right> breast tumour, <subtype>[, <lesion type> lesion][, multifocal][, bilateral
      disease]."
  side from `Tumor Location` (L/R; "Breast tumour" if missing), subtype from `Mol Subtype`
  (0 luminal-like, 1 ER/PR-positive HER2-positive, 2 HER2-enriched, 3 triple-negative),
  `<lesion type>` from `lesion_type_column` (decoded with its legend row, e.g. "0=mass, 1=non-mass")
  when given, `Multicentric/Multifocal` = 1 → "multifocal", `Bilateral Information` = 1 →
  "bilateral disease". E.g. "Left breast tumour, luminal-like subtype, mass lesion." Without
  either source each slice's caption is written from its mask by `breast_caption` (breast side,
  quadrant, number of lesions, size; marked text_from_mask in the cache), never the chest template.
- Stratum: `stratum_column="Mol Subtype"` decoded by its legend ("luminal-like", ...); "unknown"
  when missing. Which clinical column holds the paper's mass/non-mass lesion type is not
  confirmed; pass `stratum_column=<that column>` when known.
Bad cases are yielded as DatasetError so the cache builder can stop or skip them (skip_bad).
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from datasets.breast_caption import breast_caption
from datasets.dicom_series import DicomSeries, list_dicom_series, load_dicom_volume
from datasets.duke_sheets import (clinical_caption, legend_code, patient_number, read_boxes,
                                  read_clinical, read_mapping, read_text_csv)
from datasets.intensity import as_range, percentile_normalise
from datasets.records import DatasetError, Sample
from datasets.volumes import (axial_slice_to_image, read_nifti, read_nifti_pair, resample_nearest,
                              spread_indices)

PHASES = ("pre", "post_1", "post_2", "post_3", "post_4")
_DYN = re.compile(r"dyn|vibrant|\bph\s*\d|\d(st|nd|rd|th)\b|pass|\bpre\b|\bpost", re.I)
_NOT_DYN = re.compile(r"sub|mip|t2|stir|seg|loc|scout|cal", re.I)


# ---------------------------------------------------------------- ids and files
def case_id(number: int) -> str:
    return f"Breast_MRI_{number:03d}"


def _walk(root: Path, max_depth: int = 5):
    """Folders under root (≤ max_depth), not entering patient folders. Yields (dir, subdirs, files)."""
    for here, dirs, files in os.walk(root):
        depth = len(Path(here).relative_to(root).parts)
        if depth >= max_depth or re.fullmatch(r"(breast_mri|duke)_\d+", Path(here).name, re.I):
            dirs[:] = []
        yield Path(here), dirs, files


# ---------------------------------------------------------------- phases and boxes
def phase_from_description(description: str) -> str | None:
    d = description.lower()
    if re.search(r"\bpre\b", d):
        return "pre"
    m = re.search(r"ph\s*/?\s*(\d)|(\d)(?:st|nd|rd|th)\b|post\s*_?(\d)", d)
    return f"post_{next(g for g in m.groups() if g)}" if m else None


def assign_phases(series: list[DicomSeries]) -> dict[str, DicomSeries]:
    """The rule of the module docstring: {phase: series} for a patient's series."""
    dyn = [s for s in series if _DYN.search(s.description) and not _NOT_DYN.search(s.description)]
    dyn.sort(key=lambda s: (s.time, s.number if s.number is not None else -1, s.key))
    named, unnamed = {}, []
    for s in dyn:
        p = phase_from_description(s.description)
        if p in PHASES and p not in named:
            named[p] = s
        else:
            unnamed.append(s)
    for p, s in zip([p for p in PHASES if p not in named], unnamed):
        named[p] = s
    return named


def box_mask(vol, box: tuple[int, ...], where: str) -> np.ndarray:
    """1-based inclusive (rows, columns, acquisition-order slices) box → (X, Y, Z) bool on `vol`."""
    r0, r1, c0, c1, s0, s1 = box
    inst = [h.get("InstanceNumber") for h in vol.headers]
    if any(i in (None, "") for i in inst):
        raise DatasetError(f"{where}: InstanceNumber missing; box slice numbers cannot be placed")
    rank = np.argsort(np.argsort([int(i) for i in inst], kind="stable")) + 1  # (S,) 1-based
    rows, cols = int(vol.headers[0].Rows), int(vol.headers[0].Columns)
    if not (1 <= r0 <= r1 <= rows and 1 <= c0 <= c1 <= cols and 1 <= s0 <= s1 <= len(inst)):
        raise DatasetError(f"{where}: box {box} lies outside the {rows}x{cols}x{len(inst)} series; "
                           "the index-base assumption (1-based) may be wrong for this file")
    native = np.zeros((cols, rows, len(inst)), dtype=bool)  # (Co, R, S)
    native[c0 - 1:c1, r0 - 1:r1, (rank >= s0) & (rank <= s1)] = True
    return vol.native_to_ras(native)


# ---------------------------------------------------------------- the reader
class DukeReader:
    """Duke-Breast-Cancer-MRI → one Sample per selected axial slice (see the module docstring).

    Args:
        root: folder holding the TCIA tree, MAMA-MIA and/or the spreadsheets.
        phase: "pre" or "post_1".."post_4".
        mask_source: "mama-mia" (expert tumour masks) or "boxes" (Annotation_Boxes.xlsx).
        boxes_are_weak_labels: must be True with mask_source="boxes".
        negative_share: share of each case's tumour-free slices to add (0..1).
        text_csv, clinical_xlsx, mapping_xlsx, boxes_xlsx: explicit files (else found under root).
        dicom_root, mama_mia_root: explicit trees (else found under root).
        image_source: "auto", "dicom" or "mama-mia".
        stratum_column, lesion_type_column: clinical columns for the stratum and the text.
        percentiles: (low, high) for the per-volume normalisation.
    """

    name = "duke"

    def __init__(self, root, phase: str = "post_1", mask_source: str = "mama-mia",
                 boxes_are_weak_labels: bool = False, negative_share: float = 0.2,
                 text_csv=None, clinical_xlsx=None, mapping_xlsx=None, boxes_xlsx=None,
                 dicom_root=None, mama_mia_root=None, image_source: str = "auto",
                 stratum_column: str = "Mol Subtype", lesion_type_column: str | None = None,
                 percentiles: tuple[float, float] = (0.1, 99.9)):
        self.root = Path(root)
        if phase not in PHASES:
            raise ValueError(f"phase={phase!r}: expected one of {PHASES}")
        if mask_source not in ("mama-mia", "boxes") or image_source not in ("auto", "dicom", "mama-mia"):
            raise ValueError(f"mask_source={mask_source!r} / image_source={image_source!r} unknown")
        if mask_source == "boxes" and image_source == "mama-mia":
            raise ValueError("box coordinates refer to the DICOM series: use image_source='auto'")
        if mask_source == "boxes" and not boxes_are_weak_labels:
            raise DatasetError("Annotation_Boxes.xlsx holds bounding boxes, not tumour outlines; fix: "
                               "pass boxes_are_weak_labels=True to train on them as weak labels")
        if not 0.0 <= negative_share <= 1.0:
            raise ValueError(f"negative_share={negative_share}: expected a share in [0, 1]")
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: Duke root not found; fix: pass the download folder")
        self.phase, self.mask_source, self.image_source = phase, mask_source, image_source
        self.negative_share = float(negative_share)
        self.percentiles = as_range(percentiles, "percentiles")
        self.stratum_column, self.lesion_type_column = stratum_column, lesion_type_column
        self._discover(dicom_root, mama_mia_root)
        self.mapping_xlsx = self._file(mapping_xlsx, r".*filepath_filename-mapping\.xlsx")
        self.clinical_xlsx = self._file(clinical_xlsx, r"clinical_and_other_features\.xlsx")
        self.text_csv = Path(text_csv) if text_csv else None
        self.boxes_xlsx = (self._file(boxes_xlsx, r"annotation_boxes\.xlsx") if mask_source == "boxes"
                           else None)
        self._mapping_cache: dict[int, str] | None = None
        self._plan()

    def _discover(self, dicom_root, mama_mia_root) -> None:
        self.dicom_patients: dict[int, Path] = {}
        self.mama_masks: dict[int, Path] = {}
        self.mama_images: dict[int, dict[int, Path]] = {}
        self._files: list[tuple[str, Path]] = []
        for top in {self.root} | {Path(p) for p in (dicom_root, mama_mia_root) if p}:
            for here, dirs, files in _walk(top):
                self._files += [(f.lower(), here / f) for f in files]
                if re.fullmatch(r"breast_mri_\d+", here.name, re.I):
                    self.dicom_patients[patient_number(here.name)] = here
                if here.name.lower() == "expert" and here.parent.name.lower() == "segmentations":
                    for f in files:
                        if re.fullmatch(r"duke_\d+\.nii(\.gz)?", f, re.I):
                            self.mama_masks[patient_number(f)] = here / f
                if re.fullmatch(r"duke_\d+", here.name, re.I) and here.parent.name.lower() == "images":
                    for f in files:
                        m = re.fullmatch(r"duke_(\d+)_(\d{4})\.nii(\.gz)?", f, re.I)
                        if m:
                            self.mama_images.setdefault(int(m.group(1)), {})[int(m.group(2))] = here / f

    def _file(self, given, pattern: str) -> Path | None:
        if given:
            if not Path(given).is_file():
                raise DatasetError(f"{given}: file not found")
            return Path(given)
        found = sorted(p for name, p in self._files if re.fullmatch(pattern, name))
        return found[0] if found else None

    def _plan(self) -> None:
        k = PHASES.index(self.phase)
        skipped: list[str] = []
        if self.mask_source == "boxes":
            if self.boxes_xlsx is None:
                raise DatasetError(f"{self.root}: Annotation_Boxes.xlsx not found; fix: pass boxes_xlsx")
            self.boxes = read_boxes(self.boxes_xlsx)
            labelled = set(self.boxes)
            usable = {n for n in labelled if n in self.dicom_patients}
            skipped += [f"{len(labelled - usable)} boxed patients without DICOM"] if labelled - usable else []
        else:
            if not self.mama_masks:
                raise DatasetError(f"{self.root}: no MAMA-MIA segmentations/expert/DUKE_NNN.nii.gz; "
                                   "fix: pass mama_mia_root, or mask_source='boxes' with "
                                   "boxes_are_weak_labels=True")
            dicom_ok = {n for n in self.mama_masks if n in self.dicom_patients
                        and self.image_source != "mama-mia"}
            nifti_ok = {n for n in self.mama_masks if k in self.mama_images.get(n, {})
                        and self.image_source != "dicom"}
            usable = dicom_ok | nifti_ok
            if set(self.mama_masks) - usable:
                skipped.append(f"{len(set(self.mama_masks) - usable)} masked patients without a "
                               f"{self.phase} image")
        if not usable:
            raise DatasetError(f"{self.root}: no patient has both a {self.phase} image and a mask; "
                               "fix: check the DICOM/MAMA-MIA folders and the phase")
        self.cases = sorted(usable)
        self.texts, self.strata, records = {}, {}, {}
        if self.clinical_xlsx:
            records, legends = read_clinical(self.clinical_xlsx)
            for n in self.cases:
                if n in records:
                    self.texts[n] = clinical_caption(records[n], legends, self.lesion_type_column)
                    code = legend_code(records[n].get(self.stratum_column))
                    raw = records[n].get(self.stratum_column)
                    label = legends.get(self.stratum_column, {}).get(code, raw)
                    self.strata[n] = str(label).strip() if label not in (None, "") else "unknown"
        if self.text_csv:
            self.texts.update({n: t for n, t in read_text_csv(self.text_csv).items() if n in usable})
        n_dicom = sum(n in self.dicom_patients and self.image_source != "mama-mia" for n in self.cases)
        weak = " (weak box labels)" if self.mask_source == "boxes" else ""
        self.summary = (f"Duke: {len(self.cases)} patients ({n_dicom} from DICOM, "
                        f"{len(self.cases) - n_dicom} from MAMA-MIA images), phase {self.phase}, "
                        f"masks: {self.mask_source}{weak}, text for {len(self.texts)}")
        if skipped:
            self.summary += "; skipped " + ", ".join(skipped)
        warnings.warn(self.summary, stacklevel=3)

    def _mapping(self) -> dict[int, str]:
        if self._mapping_cache is None:
            self._mapping_cache = (read_mapping(self.mapping_xlsx, self.phase, self.cases)
                                   if self.mapping_xlsx else {})
        return self._mapping_cache

    def _phase_series(self, n: int) -> DicomSeries:
        folder = self.dicom_patients[n]
        series = list_dicom_series(folder)
        uid = self._mapping().get(n)
        if uid is not None:
            match = [s for s in series if s.uid == uid]
            if not match:
                raise DatasetError(f"{folder}: the mapping file names series {uid} as {self.phase}, "
                                   "but it is not on disk; fix: download that series")
            return match[0]
        phases = assign_phases(series)
        if self.phase not in phases:
            found = ", ".join(sorted({repr(s.description) for s in series}))
            raise DatasetError(f"{folder}: no series recognised as {self.phase} among {found}; fix: "
                               "pass mapping_xlsx (Breast-Cancer-MRI-filepath_filename-mapping.xlsx)")
        return phases[self.phase]

    def _load(self, n: int) -> tuple[np.ndarray, np.ndarray, str, np.ndarray]:
        """(image (X, Y, Z), mask (X, Y, Z) bool, source, RAS affine (4, 4)) for patient n."""
        k = PHASES.index(self.phase)
        if n in self.dicom_patients and self.image_source != "mama-mia":
            vol = load_dicom_volume(self._phase_series(n))
            where = str(vol.files[0].parent)
            if self.mask_source == "boxes":
                return vol.array, box_mask(vol, self.boxes[n], where), where, vol.affine
            m, m_aff = read_nifti(self.mama_masks[n])
            mask = m > 0.5
            if mask.shape != vol.array.shape or not np.allclose(m_aff, vol.affine, rtol=1e-4, atol=1e-2):
                mask = resample_nearest(mask, m_aff, vol.array.shape, vol.affine)
                if m.any() and not mask.any():
                    raise DatasetError(f"{self.mama_masks[n]} and {where}: the mask does not overlap "
                                       "the DICOM volume; fix: image_source='mama-mia'")
            return vol.array, mask, f"{where}|{self.mama_masks[n]}", vol.affine
        image_path = self.mama_images[n][k]
        image, mask, affine = read_nifti_pair(image_path, self.mama_masks[n])
        return image, mask, f"{image_path}|{self.mama_masks[n]}", affine

    def sources(self) -> list[Path]:
        out = [p for p in (self.mapping_xlsx, self.clinical_xlsx, self.text_csv, self.boxes_xlsx) if p]
        k = PHASES.index(self.phase)
        for n in self.cases:
            if self.mask_source == "mama-mia":
                out.append(self.mama_masks[n])
            if n in self.dicom_patients and self.image_source != "mama-mia":
                # DICOM series are keyed by their folders (name, mtime): one stat per series
                out += [Path(d) for d, _, files in os.walk(self.dicom_patients[n]) if files]
            else:
                out.append(self.mama_images[n][k])
        return sorted(set(out))

    def options(self) -> dict:
        return {"phase": self.phase, "mask_source": self.mask_source, "image_source": self.image_source,
                "negative_share": self.negative_share, "percentiles": list(self.percentiles),
                "stratum_column": self.stratum_column, "lesion_type_column": self.lesion_type_column,
                "mask_caption": "breast_caption v1"}

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[Sample]:
        for n in self.cases:
            try:
                image, mask, source, affine = self._load(n)
                if not mask.any():
                    raise DatasetError(f"{source}: empty tumour mask; fix: check the segmentation")
            except DatasetError as e:
                yield e  # the cache builder stops, or skips this case with skip_bad=True
                continue
            vol = percentile_normalise(image, *self.percentiles)  # (X, Y, Z) in [0, 1]
            has = mask.any(axis=(0, 1))  # (Z,)
            free = np.flatnonzero(~has)
            picked = free[spread_indices(len(free), int(round(self.negative_share * len(free))))]
            spacing = np.linalg.norm(np.asarray(affine)[:3, :2], axis=0)  # (X, Y) mm per voxel
            Z = mask.shape[2]
            for z in sorted(np.flatnonzero(has).tolist() + picked.tolist()):
                slice_mask = axial_slice_to_image(mask[:, :, z])  # (H=Y, W=X)
                text = self.texts.get(n)
                if text is None:  # RAS+: z grows toward the head
                    text = breast_caption(slice_mask, z / max(1, Z - 1), (spacing[1], spacing[0]))
                yield Sample(key=f"{case_id(n)}#{z:03d}", image=axial_slice_to_image(vol[:, :, z]),
                             mask=slice_mask, text=text, case=case_id(n), split=None,
                             stratum=self.strata.get(n, "unknown"), slice_index=int(z),
                             source=source, text_from_mask=n not in self.texts)
