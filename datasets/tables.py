"""Rows of a spreadsheet: one reader for the .xlsx workbooks and .csv tables that come with datasets
(QaTa's and MosMedData+'s LViT text workbooks, Duke's TCIA spreadsheets, user text tables)."""
from __future__ import annotations

import csv
from pathlib import Path

from datasets.records import DatasetError

__all__ = ["read_table", "header_names"]


def read_table(path, sheet: str | None = None, fix: str = "re-save it as .xlsx or .csv") -> list[tuple]:
    """Every row of a table as a tuple of cell values.

    Args:
        path: an .xlsx workbook (its `sheet`, or the first worksheet when it has none by that name;
            cells keep their types) or any other file read as UTF-8 CSV (cells are strings).
        sheet: worksheet name, for workbooks.
        fix: what the user should do when the file cannot be read (ends the DatasetError).
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".xlsx":
            import openpyxl  # slow to import; only .xlsx tables need it

            wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
            ws = wb[sheet] if sheet in wb.sheetnames else wb.worksheets[0]
            rows = [tuple(r) for r in ws.iter_rows(values_only=True)]
            wb.close()
        else:
            with open(path, newline="", encoding="utf-8-sig") as f:
                rows = [tuple(r) for r in csv.reader(f)]
    except Exception as e:  # openpyxl: BadZipFile, InvalidFileException, KeyError; csv: OSError, ...
        raise DatasetError(f"{path}: cannot read the table ({type(e).__name__}: {e}); fix: {fix}") from e
    return rows


def header_names(row) -> list[str]:
    """A header row's cells as stripped lower-case names ("" for an empty cell)."""
    return [str(c).strip().lower() if c is not None else "" for c in (row or ())]
