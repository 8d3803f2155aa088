"""Your own 2D data: a CSV that lists image, mask and text per row.

    image,mask,text,case,split
    scans/p01_a.png,labels/p01_a.png,"Unilateral pulmonary infection, ..., lower left lung.",p01,train
    scans/p02.dcm,labels/p02.png,,p02,

Columns: image, mask (required), text (required column; a cell may be empty), case, split, stratum
(optional). Paths are relative to the CSV's folder (absolute paths work too). Images: PNG, JPEG, TIFF,
BMP or DICOM (datasets/images.py says how each is converted). Masks: binary 0/1 or 0/255.

* case: the patient/study id that never crosses splits; default = the image's file stem (each
  image its own case). Give it whenever one patient has several images.
* split: train / val (valid) / test. A CSV whose split column holds any value is split by it
  (split_mode "auto", the default, resolves to "layout"; every row then needs one); "paper" ignores
  the column, with a warning.
* text: an empty cell is no caption (the model segments that image from the image alone; the cache
  build counts such rows and says so), unless text_from_mask=True, in which case the cache writes a
  QaTa-style caption from the mask (datasets/text_from_mask.py). Such a caption is derived from the
  label, so say so when you report results on it.

Bad rows (missing or unreadable files, size mismatch, non-binary mask, duplicate image) are yielded as DatasetErrors (see datasets/cache.py), so skip_bad can pass over them.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from datasets.images import load_samples, read_image_and_mask
from datasets.records import DatasetError, Sample
from datasets.splits import normalise_split

__all__ = ["CsvReader"]

_REQUIRED = ("image", "mask", "text")


@dataclass
class _Row:
    line: int
    image: Path
    mask: Path
    text: str
    case: str
    split: str
    stratum: str
    key: str


class CsvReader:
    """Rows of a CSV file (module docstring).

    Args:
        csv_path: the CSV file.
        text_from_mask: generate a caption from the mask when a row's text is empty.
    """

    name = "csv"

    def __init__(self, csv_path, text_from_mask: bool = False) -> None:
        self.csv_path = Path(csv_path).resolve()
        self.text_from_mask = bool(text_from_mask)
        if not self.csv_path.is_file():
            raise DatasetError(f"{self.csv_path}: CSV not found; expected a file with columns "
                               f"image, mask, text[, case, split]")
        try:
            with open(self.csv_path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                table = list(reader)
                header = [h.strip().lower() for h in (reader.fieldnames or []) if h]
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise DatasetError(f"{self.csv_path}: cannot read the CSV ({e}); expected UTF-8 text "
                               f"with a header row image, mask, text") from e
        missing = [c for c in _REQUIRED if c not in header]
        if missing:
            sep = next((c for c in (";", "\t", "|") if len(header) == 1 and c in header[0]), None)
            how = (f"; fix: save it with commas between the columns ({sep!r} separates them here)"
                   if sep else "")
            raise DatasetError(f"{self.csv_path}: missing column(s) {missing} (header {header}); "
                               f"expected image, mask, text and optionally case, split, stratum{how}")
        # A caption with unquoted commas spills into extra cells: joined back when text is the last
        # column (nothing can shift), refused otherwise (the pieces would land in case/split).
        text_last = header[-1] == "text"
        self.rows: list[_Row] = []
        self._problems: dict[int, str] = {}
        folder, seen = self.csv_path.parent, {}
        for i, raw in enumerate(table):
            line = i + 2  # 1-based, after the header
            surplus = raw.pop(None, None)  # cells beyond the header (csv.DictReader's restkey)
            r = {str(k).strip().lower(): (v or "").strip() for k, v in raw.items() if k}
            if surplus and text_last:
                r["text"] = ",".join([raw[reader.fieldnames[-1]] or ""] + surplus).strip()
            elif surplus:
                self._problems[line] = (f"{self.csv_path}:{line}: {len(header) + len(surplus)} cells "
                                        f"for {len(header)} columns, likely a caption with commas; "
                                        f"fix: quote the caption (\"a, b\") or make text the last "
                                        f"column")
            if not r.get("image") or not r.get("mask"):
                self._problems[line] = (f"{self.csv_path}:{line}: empty image or mask cell; "
                                        f"expected both paths")
                r.setdefault("image", "")
            image = (folder / r["image"]).resolve() if r["image"] else folder
            key = Path(r["image"]).with_suffix("").as_posix()
            if key in seen and line not in self._problems:
                self._problems[line] = (f"{self.csv_path}:{line}: image {r['image']} is listed "
                                        f"twice (also line {seen[key]}); expected one row per "
                                        f"image")
            seen.setdefault(key, line)
            split = r.get("split", "")
            if split:
                try:
                    split = normalise_split(split, f"{self.csv_path}:{line}")
                except DatasetError as e:
                    self._problems[line] = str(e)
            self.rows.append(_Row(line, image, (folder / r.get("mask", "")).resolve(),
                                  r.get("text", ""), r.get("case") or Path(r["image"]).stem,
                                  split, r.get("stratum", ""), key))
        if not self.rows:
            raise DatasetError(f"{self.csv_path}: no rows; expected one row per image")
        # The user wrote the split: datasets.registry.resolve_split_mode keeps it.
        self.declares_splits = any(r.split for r in self.rows)

    def locate(self, source: str) -> str:
        """`csv:line` of the row whose image is `source` (for messages about a row)."""
        line = next((r.line for r in self.rows if str(r.image) == source), None)
        return f"{self.csv_path}:{line}" if line else source

    def sources(self) -> list[Path]:
        files = {self.csv_path}
        for r in self.rows:
            files.update(p for p in (r.image, r.mask) if p.is_file())
        return sorted(files)

    def options(self) -> dict:
        return {"csv": str(self.csv_path), "text_from_mask": self.text_from_mask}

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, r: _Row) -> Sample:
        """Read one row (raises DatasetError naming the file and line)."""
        if r.line in self._problems:
            raise DatasetError(self._problems[r.line])
        image, mask = read_image_and_mask(r.image, r.mask, f" ({self.csv_path.name} line {r.line})")
        text = r.text.strip() or (None if self.text_from_mask else "")  # None: caption from the mask
        return Sample(key=r.key, image=image, mask=mask, text=text, case=r.case,
                      split=r.split or None, stratum=r.stratum, source=str(r.image))

    def __iter__(self):
        """Samples in row order; a bad row is yielded as its DatasetError (datasets/cache.py)."""
        yield from load_samples(self.load, self.rows)
