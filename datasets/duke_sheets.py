"""Duke-Breast-Cancer-MRI's spreadsheets: clinical features, annotation boxes, the file mapping,
and a user text table, each read into a dict keyed by patient number.

The TCIA workbooks (`Clinical_and_Other_Features.xlsx` with its three header rows,
`Annotation_Boxes.xlsx`, `Breast-Cancer-MRI-filepath_filename-mapping.xlsx`) are table formats
with rules of their own; keeping them here leaves datasets/duke.py to finding the images and
masks of each patient and cutting them into slices. `clinical_caption` is the caption template
over a clinical record (see datasets/duke.py for what it writes and why).
"""
from __future__ import annotations

import re
from pathlib import Path

from datasets.records import DatasetError
from datasets.tables import header_names, read_table

__all__ = ["SUBTYPES", "patient_number", "parse_legend", "read_clinical", "legend_code",
           "clinical_caption", "read_text_csv", "read_boxes", "read_mapping"]

SUBTYPES = {0: "luminal-like subtype", 1: "ER/PR-positive HER2-positive subtype",
            2: "HER2-enriched subtype", 3: "triple-negative subtype"}
_BOX_COLUMNS = ("start row", "end row", "start column", "end column", "start slice", "end slice")
_TCIA_FIX = "re-download it from TCIA"


def patient_number(text) -> int | None:
    """123 from "Breast_MRI_123", "DUKE_123", "duke_123_0001.nii.gz", "123"; None otherwise."""
    m = re.search(r"(?:breast_mri_|duke_|^)0*(\d+)", str(text).strip(), re.I)
    return int(m.group(1)) if m else None



def _columns(header, path: Path, wanted) -> list[int]:
    names = header_names(header)
    missing = [w for w in wanted if w not in names]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing}; found {names}; fix: use the "
                           "TCIA file or rename the columns")
    return [names.index(w) for w in wanted]


def parse_legend(text) -> dict[int, str]:
    """"0=luminal-like, 1=ER/PR+, HER2+ , 2=her2" → {0: "luminal-like", 1: "ER/PR+, HER2+", 2: "her2"}."""
    parts = re.split(r"(-?\d+)\s*=\s*", str(text or ""))
    return {int(parts[i]): parts[i + 1].strip(" ,;") for i in range(1, len(parts) - 1, 2)}


def read_clinical(path: Path) -> tuple[dict[int, dict], dict[str, dict[int, str]]]:
    """Clinical_and_Other_Features.xlsx → ({patient: {column: value}}, {column: legend codes})."""
    rows = read_table(path, "Data", fix=_TCIA_FIX)
    if len(rows) < 4:
        raise DatasetError(f"{path}: expected three header rows (category, name, legend) and data")
    names = [str(c).strip() if c is not None else "" for c in rows[1]]
    if "Patient ID" not in names:
        raise DatasetError(f"{path}: no 'Patient ID' in the second header row; fix: keep TCIA's "
                           "three header rows")
    legends = {n: parse_legend(rows[2][i]) for i, n in enumerate(names) if n and i < len(rows[2])}
    pid = names.index("Patient ID")
    first = {n: i for i, n in reversed(list(enumerate(names))) if n}  # a repeated name: first wins
    records = {}
    for r in rows[3:]:
        num = patient_number(r[pid]) if r and r[pid] is not None else None
        if num is not None:
            records[num] = {n: r[i] for n, i in first.items() if i < len(r)}
    return records, legends


def legend_code(value) -> int | None:
    """A clinical cell's integer code (1, 1.0, "1" → 1), the key of its legend; None if not a number."""
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def clinical_caption(record: dict, legends: dict, lesion_type_column: str | None = None) -> str:
    """The template of datasets/duke.py's docstring, e.g. "Left breast tumour, luminal-like subtype."."""
    side = {"L": "Left", "R": "Right"}.get(str(record.get("Tumor Location") or "").strip().upper()[:1])
    parts = [f"{side} breast tumour" if side else "Breast tumour"]
    subtype = SUBTYPES.get(legend_code(record.get("Mol Subtype")))
    if subtype:
        parts.append(subtype)
    if lesion_type_column:
        code = legend_code(record.get(lesion_type_column))
        label = legends.get(lesion_type_column, {}).get(code)
        if label:
            parts.append(f"{label} lesion")
    if legend_code(record.get("Multicentric/Multifocal")) == 1:
        parts.append("multifocal")
    if legend_code(record.get("Bilateral Information")) == 1:
        parts.append("bilateral disease")
    return ", ".join(parts) + "."


def read_text_csv(path: Path) -> dict[int, str]:
    """User CSV: a case/patient column and a text column → {patient number: text}."""
    rows = read_table(path, fix="save the text table as UTF-8 CSV")
    names = header_names(rows[0] if rows else ())
    key = next((names.index(c) for c in ("case", "patient", "patient id", "patient_id") if c in names), None)
    txt = next((names.index(c) for c in ("text", "description", "caption") if c in names), None)
    if key is None or txt is None:
        raise DatasetError(f"{path}: expected columns 'case' (or 'patient') and 'text'; found {names}")
    out = {}
    for r in rows[1:]:
        if len(r) > max(key, txt) and patient_number(r[key]) is not None and r[txt].strip():
            out[patient_number(r[key])] = r[txt].strip()
    return out


def read_boxes(path: Path) -> dict[int, tuple[int, ...]]:
    """Annotation_Boxes.xlsx → {patient: (start row, end row, start col, end col, start slice, end slice)}."""
    rows = read_table(path, fix=_TCIA_FIX)
    h = next((i for i, r in enumerate(rows[:5]) if any(str(c).strip().lower() == "patient id"
                                                        for c in r if c is not None)), None)
    if h is None:
        raise DatasetError(f"{path}: no 'Patient ID' header; fix: use TCIA's Annotation_Boxes.xlsx")
    cols = _columns(rows[h], path, ("patient id",) + _BOX_COLUMNS)
    return {patient_number(r[cols[0]]): tuple(int(r[c]) for c in cols[1:])
            for r in rows[h + 1:] if r and r[cols[0]] is not None}


def read_mapping(path: Path, phase: str, patients) -> dict[int, str]:
    """Mapping workbook → {patient: SeriesInstanceUID of `phase`} (UID from `classic_path`)."""
    rows = read_table(path, fix=_TCIA_FIX)
    orig, classic = _columns(rows[0], path, ("original_path_and_filename", "classic_path"))
    wanted, out = set(patients), {}
    for r in rows[1:]:
        if not r or r[orig] is None or r[classic] is None:
            continue
        parts = str(r[orig]).replace("\\", "/").split("/")
        num = patient_number(next((p for p in parts if re.match(r"breast_?mri_\d+", p, re.I)), ""))
        if num in wanted and num not in out and len(parts) > 1 and parts[-2].lower() == phase:
            out[num] = str(r[classic]).replace("\\", "/").split("/")[-2]
    return out
