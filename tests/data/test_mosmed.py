"""MosMed readers on small synthetic trees in the real layouts (COVID19_1110, frames/masks, LViT)."""
import warnings
from pathlib import Path

import numpy as np
import pytest

from datasets.records import DatasetError, Sample
from datasets.mosmed import MosmedPlusReader, MosmedReader, mosmedplus_case

nib = pytest.importorskip("nibabel")

X, Y = 10, 8  # canonical RAS+ size of the synthetic volumes


def save_ras(path: Path, canon: np.ndarray, on_disk=("R", "A", "S")) -> None:
    """Save a RAS+ array (X, Y, Z), stored on disk in the orientation `on_disk` (same world grid)."""
    from nibabel.orientations import axcodes2ornt

    aff = np.diag([0.7, 0.7, 5.0, 1.0])
    aff[:3, 3] = [-100.0, -80.0, -200.0]
    img = nib.Nifti1Image(canon, aff).as_reoriented(axcodes2ornt(on_disk))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def ct(z: int, fill=-1000) -> np.ndarray:
    return np.full((X, Y, z), fill, dtype=np.int16)


@pytest.fixture
def covid_root(tmp_path) -> Path:
    root = tmp_path / "COVID19_1110"
    s = root / "studies"
    save_ras(s / "CT-0" / "study_0001.nii.gz", ct(20))
    save_ras(s / "CT-0" / "study_0002.nii", ct(5))
    lesion = ct(6)
    lesion[8:10, 6:8, 3] = -600  # patient right (high x), anterior (high y), slice 3
    mask = np.zeros((X, Y, 6), np.uint8)
    mask[8:10, 6:8, 3] = 1
    save_ras(s / "CT-1" / "study_0255.nii.gz", lesion, on_disk=("L", "A", "S"))
    save_ras(root / "masks" / "study_0255_mask.nii.gz", mask, on_disk=("P", "S", "R"))
    save_ras(s / "CT-1" / "study_0256.nii", ct(4))  # uncompressed image, empty mask
    save_ras(root / "masks" / "study_0256_mask.nii.gz", np.zeros((X, Y, 4), np.uint8))
    save_ras(s / "CT-1" / "study_0500.nii.gz", ct(4))  # lesions but no mask: skipped
    save_ras(root / "extra" / "deep" / "CT-2" / "study_0700.nii.gz", ct(4))  # nested, no mask
    return root


def samples(reader) -> list[Sample]:
    out = list(reader)
    errors = [s for s in out if isinstance(s, DatasetError)]
    if errors:
        raise errors[0]
    return out


def test_covid1110_plan_summary_and_slices(covid_root):
    with pytest.warns(UserWarning) as rec:
        reader = MosmedReader(covid_root)
    summary = " ".join(str(w.message) for w in rec)
    assert "2 studies with lesion masks (CT-1: study_0255..study_0256)" in summary
    assert "2 CT-0 negatives" in summary and "skipped 1 CT-1, 1 CT-2" in summary
    assert len(reader) == 4
    assert {p.name for p in reader.sources()} >= {"study_0255.nii.gz", "study_0255_mask.nii.gz",
                                                  "study_0256.nii", "study_0002.nii"}
    out = samples(reader)
    by_case = {}
    for s in out:
        by_case.setdefault(s.case, []).append(s)
    assert set(by_case) == {"study_0001", "study_0002", "study_0255", "study_0256"}
    # 10 bin centres of 20 slices: (j + 0.5) * 2 = 1, 3, ..., 19; a 5-slice study gives all 5
    assert [s.slice_index for s in by_case["study_0001"]] == list(range(1, 20, 2))
    assert [s.slice_index for s in by_case["study_0002"]] == list(range(5))
    assert [s.slice_index for s in by_case["study_0255"]] == list(range(6))
    assert len({s.key for s in out}) == len(out)
    for s in out:
        assert s.text is None and s.split is None
        assert s.stratum == ("CT-0" if s.case in ("study_0001", "study_0002") else "CT-1")
        assert s.image.dtype == np.float32 and s.mask.dtype == bool and s.image.shape == (Y, X)
    assert not any(s.mask.any() for c in ("study_0001", "study_0002", "study_0256") for s in by_case[c])


def test_lesion_lands_top_left_in_the_radiological_view(covid_root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = MosmedReader(covid_root, include_negatives=False)
    s3 = next(s for s in samples(reader) if s.key == "study_0255#003")
    expected = np.zeros((Y, X), bool)
    expected[0:2, 0:2] = True  # rows: anterior first; columns: patient right first
    assert np.array_equal(s3.mask, expected)
    # lung window W1500/L-600: -600 HU → 0.5, -1000 HU → 350/1500
    assert np.allclose(s3.image[expected], 0.5)
    assert np.allclose(s3.image[~expected], 350.0 / 1500.0)


def test_options_negatives_all_or_off_and_flattened_layout(tmp_path, covid_root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        every = MosmedReader(covid_root, negative_slices="all")
        off = MosmedReader(covid_root, include_negatives=False)
        flat = tmp_path / "flat"  # amid-style: CT-k and masks side by side, no studies/
        for src in covid_root.rglob("*.nii*"):
            if "CT-1" in src.parts or "masks" in src.parts:
                dest = flat / src.parent.name / src.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(src.read_bytes())
        flat_reader = MosmedReader(flat)
    assert sum(1 for s in samples(every) if s.case == "study_0001") == 20
    assert {s.case for s in samples(off)} == {"study_0255", "study_0256"}
    assert len(flat_reader) == 2
    assert every.options()["negative_slices"] == "all" and off.options()["include_negatives"] is False
    with pytest.raises(ValueError):
        MosmedReader(covid_root, negative_slices=0)


def test_registry_passes_command_line_options(covid_root):
    registry = pytest.importorskip("datasets.registry")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = registry.make_reader("mosmed", str(covid_root), window="-1000,400", negative_slices=3)
    assert reader.options()["window"] == [-1000.0, 400.0]
    s = next(s for s in samples(reader) if s.key == "study_0255#003")
    assert np.allclose(s.image[0:2, 0:2], 400.0 / 1400.0)  # -600 HU in the [-1000, 400] window
    with pytest.raises(ValueError, match="window"):
        MosmedReader(covid_root, window="wide")


def test_bad_volumes_are_reported_with_their_files(tmp_path, covid_root):
    save_ras(covid_root / "masks" / "study_0256_mask.nii.gz", np.zeros((X, Y, 3), np.uint8))
    (covid_root / "studies" / "CT-0" / "study_0002.nii").write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = list(MosmedReader(covid_root))
    errors = [str(e) for e in out if isinstance(e, DatasetError)]
    assert len(errors) == 2
    assert any("study_0256.nii and" in e and "study_0256_mask.nii.gz" in e for e in errors)
    assert any("study_0002.nii" in e and "cannot read NIfTI" in e for e in errors)
    (tmp_path / "empty" / "CT-0").mkdir(parents=True)
    save_ras(tmp_path / "empty" / "CT-0" / "study_0001.nii.gz", ct(3))
    with pytest.raises(DatasetError, match="no masks/study_XXXX_mask"):
        MosmedReader(tmp_path / "empty")


def test_builds_a_cache_without_cross_split_cases(tmp_path, covid_root):
    cache = pytest.importorskip("datasets.cache")
    import json

    for i in range(3, 23):  # enough CT-0 cases for a 7:1:2 split of every stratum
        save_ras(covid_root / "studies" / "CT-0" / f"study_{i:04d}.nii.gz", ct(3))
    for i in range(257, 267):
        save_ras(covid_root / "studies" / "CT-1" / f"study_{i:04d}.nii.gz", ct(3))
        save_ras(covid_root / "masks" / f"study_{i:04d}_mask.nii.gz", np.zeros((X, Y, 3), np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = MosmedReader(covid_root, negative_slices=2)
        out = cache.build_cache(reader, tmp_path / "cache", image_size=32, progress=False)
    rows = json.loads((out / "index.json").read_text())
    split_of = {}
    for r in rows:
        assert split_of.setdefault(r["case"], r["split"]) == r["split"]
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert {r["stratum"] for r in rows if r["split"] == "test"} == {"CT-0", "CT-1"}


# ---------------------------------------------------------------- MosMedData+
def write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def slice_pair(seed: int):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(12, 9))
    mask = np.zeros((12, 9), np.uint8)
    mask[2 + seed % 5: 6 + seed % 5, 3:6] = 255
    return img, mask


NAMES = ["Morozov_study_0001_10", "Morozov_study_0001_11", "Jun_coronacases_case3_100",
         "Jun_radiopaedia_40_86625_0_case18_57", "bjorke_8", "bjorke_9"]


def test_case_ids_follow_the_study_prefix():
    assert [mosmedplus_case(n) for n in NAMES] == [
        "Morozov_study_0001", "Morozov_study_0001", "Jun_coronacases_case3",
        "Jun_radiopaedia_40_86625_0_case18", "bjorke_8", "bjorke_9"]


def test_frames_and_masks_layout(tmp_path):
    root = tmp_path / "archive"
    for i, n in enumerate(NAMES):
        img, mask = slice_pair(i)
        write_png(root / "frames" / f"{n}.png", img)
        write_png(root / "masks" / f"{n}.png", mask)
    write_png(root / "frames" / "orphan_1.png", slice_pair(9)[0])
    with pytest.warns(UserWarning, match="image without mask"):
        reader = MosmedPlusReader(tmp_path)  # frames/ found one level down
    out = samples(reader)
    assert sorted(s.key for s in out) == sorted(NAMES)
    for s in out:
        img, mask = slice_pair(NAMES.index(s.key))
        assert np.allclose(s.image, img / 255.0) and np.array_equal(s.mask, mask > 127)
        assert s.text is None and s.split is None and s.case == mosmedplus_case(s.key)
    assert {s.stratum for s in out} == {"Morozov", "Jun_coronacases", "Jun_radiopaedia", "bjorke"}


def write_workbook(path: Path, rows) -> None:
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["Image", "Description "])  # stray space in the header, as in some copies
    for r in rows:
        ws.append(list(r))
    path.parent.mkdir(parents=True, exist_ok=True)
    wb.save(path)


def test_lvit_layout_with_workbooks(tmp_path):
    root = tmp_path / "MosMedDataPlus"
    plan = {"Train_Folder": NAMES[:3], "Val_Folder": NAMES[3:4], "Test_Folder": NAMES[4:]}
    for folder, names in plan.items():
        for n in names:
            img, mask = slice_pair(NAMES.index(n))
            write_png(root / folder / "img" / f"{n}.png", img)
            prefix = "mask_" if folder == "Test_Folder" else ""  # both labelcol namings occur
            write_png(root / folder / "labelcol" / f"{prefix}{n}.png", mask)
    write_workbook(root / "Train_Folder" / "Train_text_MosMedData+ 1.xlsx",
                   [(NAMES[0] + ".png", "Unilateral pulmonary infection, one infected area, lower left lung."),
                    (NAMES[1], "Bilateral pulmonary infection, two infected areas."),
                    (NAMES[2], "Unilateral pulmonary infection, one infected area, upper right lung.")])
    write_workbook(root / "Test_text_MosMedData+.xlsx",
                   [("mask_bjorke_8.png", "Unilateral pulmonary infection."), ("bjorke_9", "No text?")])
    reader = MosmedPlusReader(root)
    assert reader.layout == "lvit"
    out = {s.key: s for s in samples(reader)}
    assert out[NAMES[0]].text.endswith("lower left lung.") and out[NAMES[0]].split == "train"
    assert out[NAMES[1]].text.startswith("Bilateral")
    assert out[NAMES[3]].text is None and out[NAMES[3]].split == "val"  # no Val workbook
    assert out["bjorke_8"].text == "Unilateral pulmonary infection." and out["bjorke_8"].split == "test"
    img, mask = slice_pair(4)
    assert np.array_equal(out["bjorke_8"].mask, mask > 127)
    assert any(p.name == "Test_text_MosMedData+.xlsx" for p in reader.sources())


def test_mosmedplus_bad_files_name_the_file(tmp_path):
    img, mask = slice_pair(0)
    write_png(tmp_path / "frames" / "a_1.png", img)
    write_png(tmp_path / "masks" / "a_1.png", mask[:10])
    (tmp_path / "frames" / "b_1.png").write_bytes(b"not a png")
    write_png(tmp_path / "masks" / "b_1.png", mask)
    errors = [str(e) for e in MosmedPlusReader(tmp_path) if isinstance(e, DatasetError)]
    assert len(errors) == 2
    assert any("a_1.png and" in e and "differ in size" in e for e in errors)
    assert any("b_1.png" in e for e in errors)
    with pytest.raises(DatasetError, match="frames/ and masks/"):
        MosmedPlusReader(tmp_path / "frames")
