"""Bad input gives one clear message naming the file (and CSV line) or flag, and the fix."""
import csv
import errno

import numpy as np
import pytest
import torch
from PIL import Image

import eval as evaluate
from datasets.cache import build_cache
from datasets.cached import load_index
from datasets.csvset import CsvReader
from datasets.images import read_image
from datasets.records import DatasetError
from tests.data.test_data_cache import SIZE, _make_set, _read_csv

CAPTION = "bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------- CSV captions with commas

def test_unquoted_commas_in_a_last_text_column_stay_in_the_caption(tmp_path):
    csv_path, _ = _make_set(tmp_path, n_cases=10, per_case=1)
    rows = _read_csv(csv_path)
    _write_lines(tmp_path / "plain.csv", ["image,mask,case,text"]
                 + [f"{r['image']},{r['mask']},{r['case']},{CAPTION}" for r in rows])
    reader = CsvReader(tmp_path / "plain.csv")
    assert [r.text for r in reader.rows] == [CAPTION] * 10
    cache = build_cache(reader, tmp_path / "c", SIZE, split_mode="paper", progress=False)
    assert {r["text"] for r in load_index(cache)} == {CAPTION}


def test_unquoted_commas_before_other_columns_are_refused_with_the_line(tmp_path):
    csv_path, _ = _make_set(tmp_path, n_cases=10, per_case=1)
    rows = _read_csv(csv_path)
    lines = ["image,mask,text,case"] + [f"{r['image']},{r['mask']},\"{CAPTION}\",{r['case']}" for r in rows]
    lines[2] = f"{rows[1]['image']},{rows[1]['mask']},{CAPTION},{rows[1]['case']}"  # line 3 unquoted
    _write_lines(tmp_path / "shift.csv", lines)
    with pytest.raises(DatasetError, match=r"shift\.csv:3: .*fix: quote the caption"):
        build_cache(CsvReader(tmp_path / "shift.csv"), tmp_path / "c", SIZE, progress=False)
    assert not (tmp_path / "c").exists()
    # skip_bad passes over that row and lists it; the quoted rows keep their whole caption.
    cache = build_cache(CsvReader(tmp_path / "shift.csv"), tmp_path / "c", SIZE, split_mode="paper",
                        skip_bad=True, progress=False)
    index = load_index(cache)
    assert len(index) == 9 and {r["text"] for r in index} == {CAPTION}
    assert {r["case"] for r in index} == {r["case"] for i, r in enumerate(rows) if i != 1}


# ---------------------------------------------------------------------------- separators and split cells

def test_a_semicolon_csv_is_named_as_such(tmp_path):
    _write_lines(tmp_path / "semi.csv", ["image;mask;text", "a.png;b.png;lesion"])
    with pytest.raises(DatasetError, match=r"semi\.csv: missing column.*fix: save it with commas.*';'"):
        CsvReader(tmp_path / "semi.csv")


def test_an_empty_split_cell_names_the_csv_line(tmp_path):
    csv_path, _ = _make_set(tmp_path, n_cases=6, per_case=1)
    rows = _read_csv(csv_path)
    for r, s in zip(rows, ["train", "train", "val", "", "test", "train"]):
        r["split"] = s
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(DatasetError, match=r"data\.csv:5: empty split cell.*fix: .*--split-mode paper"):
        build_cache(CsvReader(csv_path), tmp_path / "c", SIZE, split_mode="layout", progress=False)


# ---------------------------------------------------------------------------- fixes name flags

def test_fix_texts_name_flags_not_python_arguments(tmp_path, monkeypatch):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError) as e:
        read_image(tmp_path / "bad.png")
    assert "--skip-bad" in str(e.value) and "skip_bad=" not in str(e.value)

    import datasets.dicom_series as dicom_series

    class Series:
        def __init__(self, key):
            self.key, self.uid, self.description, self.files = key, key + ".1", "axial", [1, 2]

    monkeypatch.setattr(dicom_series, "list_dicom_series", lambda folder: [Series("s1"), Series("s2")])
    with pytest.raises(DatasetError, match=r"2 series found.*fix: choose one with --series-uid"):
        dicom_series._pick_series(tmp_path, None)
    with pytest.raises(DatasetError, match=r"no series 'x'; fix: --series-uid with one of s1, s2"):
        dicom_series._pick_series(tmp_path, "x")


# ---------------------------------------------------------------------------- volumes with NaN

@pytest.mark.parametrize("intensity", ["minmax", "ct"])
def test_a_volume_with_nan_voxels_is_refused_and_no_mask_written(tmp_path, intensity):
    nib = pytest.importorskip("nibabel")
    data = np.full((8, 8, 3), 100.0, np.float32)
    data[2:5, 2:5, :] = 900.0
    data[0, 0, 1] = np.nan
    data[1, 0, 2] = np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "vol.nii.gz"))
    with pytest.raises(DatasetError, match=r"vol\.nii\.gz: 2 of 192 voxels are NaN or infinite.*fix: "):
        evaluate.predict_volume(tmp_path / "vol.nii.gz", lambda im: im > 0.5, size=8,
                                out=tmp_path / "m.nii.gz", intensity=intensity)
    assert not (tmp_path / "m.nii.gz").exists()


# ---------------------------------------------------------------------------- 16-bit images

def test_a_16_bit_image_gets_a_note_about_its_scaling(tmp_path, capsys):
    arr = (np.arange(64).reshape(8, 8) * 500).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    Image.fromarray((arr // 128).astype(np.uint8)).save(tmp_path / "flat.png")
    for name in ("flat", "deep"):
        evaluate.predict_image(tmp_path / f"{name}.png", lambda im: im > 0.5, 8, tmp_path / f"{name}_m.png")
    out = capsys.readouterr().out
    assert out.count("note:") == 1 and "deep.png has I;16" in out and "fix: " in out


# ---------------------------------------------------------------------------- captions the model cannot read

@pytest.fixture(scope="module")
def tiny_model():
    from tmc.config import tiny_config
    from tmc.model import build_model

    torch.manual_seed(0)
    return build_model(tiny_config(image_size=32)).eval()


@pytest.mark.parametrize("text, message", [("...", "no letters or digits"),
                                           ("肺部感染", "no English word"),
                                           ("😷 😷", "no letters or digits")])
def test_captions_without_readable_words_are_refused(tiny_model, text, message):
    from tmc.predict import make_segmenter

    with pytest.raises(ValueError, match=f"--text.*{message}.*fix: "):
        make_segmenter(tiny_model, text, torch.device("cpu"))


def test_unknown_words_in_a_caption_are_named(tiny_model):
    from tmc.predict import make_segmenter

    with pytest.warns(UserWarning, match=r"2 word\(s\) the English text model cannot read: \['肺', '😷'\]"):
        make_segmenter(tiny_model, "left lung 肺 😷", torch.device("cpu"))


# ---------------------------------------------------------------------------- writing the mask

def test_a_full_disk_writing_a_mask_keeps_the_earlier_one(tmp_path, monkeypatch):
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "x.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x_mask.png").write_bytes(b"an earlier mask")

    def full(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(DatasetError, match=r"--out .*x_mask\.png: the disk is full; nothing was written; "
                                         r"fix: free space there"):
        evaluate.predict_image(tmp_path / "x.png", lambda im: im > 0.5, 8, tmp_path / "out" / "x_mask.png")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x_mask.png"]
    assert (tmp_path / "out" / "x_mask.png").read_bytes() == b"an earlier mask"


def test_a_read_only_mask_folder_is_named(tmp_path, read_only_dir):
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(DatasetError, match=r"cannot write there \(Read-only file system\).*fix: --out in a "
                                         r"folder you can write"):
        evaluate.predict_image(tmp_path / "x.png", lambda im: im > 0.5, 8, read_only_dir / "m.png")
