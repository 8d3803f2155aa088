"""datasets/tables.py: the one reader of .xlsx workbooks and .csv tables."""
import openpyxl
import pytest

from datasets.records import DatasetError
from datasets.tables import header_names, read_table


def _workbook(path, sheets):
    wb = openpyxl.Workbook()
    wb.remove(wb.active)
    for name, rows in sheets.items():
        ws = wb.create_sheet(name)
        for r in rows:
            ws.append(r)
    wb.save(path)


def test_workbook_rows_keep_cell_types_and_the_named_sheet_is_read(tmp_path):
    path = tmp_path / "t.xlsx"
    _workbook(path, {"Notes": [["ignored"]], "Data": [[" Image ", "Description", None], ["a.png", "text", 3]]})
    assert read_table(path, "Data") == [(" Image ", "Description", None), ("a.png", "text", 3)]
    assert read_table(path) == [("ignored",)]  # no sheet asked for: the first
    assert read_table(path, "Missing") == [("ignored",)]  # no such sheet: the first


def test_csv_rows_are_strings_and_a_byte_order_mark_is_dropped(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("\ufeffImage,Description\na.png,\"left, upper\"\n", encoding="utf-8")
    assert read_table(path) == [("Image", "Description"), ("a.png", "left, upper")]


def test_an_unreadable_table_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "broken.xlsx"
    path.write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match=r"broken\.xlsx: cannot read the table .*fix: re-download"):
        read_table(path, fix="re-download it")
    with pytest.raises(DatasetError, match=r"missing\.csv: cannot read the table"):
        read_table(tmp_path / "missing.csv")


def test_header_names_are_stripped_lower_case():
    assert header_names((" Image ", None, "Patient ID", 3)) == ["image", "", "patient id", "3"]
    assert header_names(None) == []
