"""datasets/qata.py: the four public QaTa-COV19 layouts as tiny fixtures, and the real subset."""
import copy
import csv
import json
import warnings
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from datasets.cache import build_cache
from datasets.cached import load_index, load_meta
from datasets.qata import QataReader, patient_id
from datasets.records import DatasetError
from datasets.splits import assign_splits, check_no_leak
from datasets.text_from_mask import mask_zones

S = 12
NAMES = ["covid_1", "covid_2", "covid_3", "covid_4",
         "sub-S00001_ses-E1_run-1_bp-chest_vp-ap_dx", "sub-S00001_ses-E2_run-1_bp-chest_vp-ap_cr",
         "sub-S00002_ses-E3_run-1_bp-chest_vp-pa_dx", "covid_5"]
# Text-row spellings seen in the wild: with/without "mask_", with/without ".png", other case.
ROW_KEY = {"covid_1": "mask_covid_1.png", "covid_2": "mask_covid_2", "covid_3": "covid_3.png",
           "covid_4": "COVID_4"}


def _pair(img_dir, mask_dir, name, i, image_suffix=".png"):
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    image = np.full((S, S), 10 * i, np.uint8)
    mask = np.zeros((S, S), np.uint8)
    mask[i % 6: i % 6 + 3, 1:4] = 255
    Image.fromarray(image).save(img_dir / f"{name}{image_suffix}")
    Image.fromarray(mask).save(mask_dir / f"mask_{name}.png")


def _text(name):
    return f"Unilateral pulmonary infection, one infected area, upper left lung ({name})."


def _row_key(name):
    return ROW_KEY.get(name, f"mask_{name}.png")


def _xlsx(path, rows, header=("Image", "Description")):
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(list(header))
    for r in rows:
        ws.append(list(r))
    path.parent.mkdir(parents=True, exist_ok=True)
    wb.save(path)


def _csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image", "Description"])
        w.writerows(rows)


def make_kaggle(root, ids=True):
    base = root / "QaTa-COV19" / "QaTa-COV19-v2"
    train, test = NAMES[:6], NAMES[6:]
    for i, n in enumerate(NAMES):
        folder = base / ("Train Set" if n in train else "Test Set")
        _pair(folder / "Images", folder / "Ground-truths", n, i)
    Image.fromarray(np.zeros((S, S), np.uint8)).save(base / "Train Set" / "Images" / "extra.png")
    _xlsx(root / "Train_text_for_Covid19.xlsx", [(_row_key(n), _text(n)) for n in train])
    _xlsx(root / "Test_text_for_Covid19.xlsx", [(_row_key(n), _text(n)) for n in test]
          + [("mask_covid_999.png", "a row without an image")])
    if ids:
        _xlsx(root / "Train_ID.xlsx", [(f"mask_{n}.png",) for n in train[:4]], header=("Image",))
        _xlsx(root / "Val_ID.xlsx", [(f"mask_{n}.png",) for n in train[4:]], header=("Image",))
    return root


def make_lvit(root):
    folders = {"Train_Folder": NAMES[:4], "Val_Folder": NAMES[4:6], "Test_Folder": NAMES[6:]}
    for i, n in enumerate(NAMES):
        f = next(k for k, v in folders.items() if n in v)
        _pair(root / f / "img", root / f / "labelcol", n, i, ".tif" if n == "covid_2" else ".png")
    for f, names in folders.items():
        _xlsx(root / f / f"{f.split('_')[0]}_text.xlsx", [(_row_key(n), _text(n)) for n in names])
    return root


def make_guidedecoder(root):
    base = root / "data" / "QaTa-COV19-v2"
    train, test = NAMES[:5], NAMES[5:]
    for i, n in enumerate(NAMES):
        folder = base / ("Train" if n in train else "Test")
        _pair(folder / "Images", folder / "GTs", n, i)
    _csv(base / "prompt" / "train.csv", [(_row_key(n), _text(n)) for n in train])
    _csv(base / "prompt" / "test.csv", [(_row_key(n), _text(n)) for n in test])
    return root


def make_sgseg(root):
    ann = {"train": [], "valid": []}
    for i, n in enumerate(NAMES):
        split = "train" if i < 6 else "valid"
        _pair(root / "images" / split / "images", root / "images" / split / "masks", n, i)
        ann[split].append({"image_path": f"mask_{n}.png", "caption": _text(n)})
    (root / "prompts").mkdir()
    (root / "prompts" / "annotation.json").write_text(json.dumps(ann))
    return root


def _read(reader):
    out = list(reader)
    errors = [s for s in out if isinstance(s, Exception)]
    assert not errors, errors
    return {s.key: s for s in out}


@pytest.mark.parametrize("make, layout, splits", [
    (make_kaggle, "kaggle", {"train": 4, "val": 2, "test": 2}),
    (make_lvit, "lvit", {"train": 4, "val": 2, "test": 2}),
    (make_guidedecoder, "guidedecoder", {"train": 4, "val": 1, "test": 3}),
    (make_sgseg, "sgseg", {"train": 6, "val": 2}),
])
def test_layouts_pair_images_masks_text(tmp_path, make, layout, splits):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reader = QataReader(make(tmp_path))
    assert reader.layout == layout and len(reader) == len(NAMES)
    samples = _read(reader)
    assert sorted(samples) == sorted(NAMES)
    for i, n in enumerate(NAMES):
        s = samples[n]
        assert s.text == _text(n)  # every key spelling matched
        assert s.image.shape == (S, S) and s.image.dtype == np.float32
        np.testing.assert_allclose(s.image, 10 * i / 255, atol=1e-6)
        assert s.mask.dtype == bool and s.mask.sum() == 9
    assert Counter(s.split for s in samples.values()) == splits
    assert samples[NAMES[4]].case == samples[NAMES[5]].case == "sub-s00001"
    assert samples["covid_1"].case == "covid_1"
    if layout == "kaggle":  # nothing dropped silently
        msgs = " | ".join(str(w.message) for w in caught)
        assert "1 images without a mask (extra.png)" in msgs
        assert "1 text rows without an image (covid_999)" in msgs


def test_layout_mode_cache_and_kaggle_without_id_lists(tmp_path):
    root = make_kaggle(tmp_path / "k")
    with pytest.warns(UserWarning):
        cache = build_cache(QataReader(root), tmp_path / "c", 8, split_mode="layout",
                            ratios=(0.7, 0.1, 0.2), progress=False)
    assert load_meta(cache)["counts"] == {"train": 4, "val": 2, "test": 2}
    assert np.load(cache / "images.npy").shape == (8, 8, 8)

    root = make_kaggle(tmp_path / "k2", ids=False)  # train/test only: no val in the layout
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="val split is empty"):
        build_cache(QataReader(root), tmp_path / "c2", 8, split_mode="layout", progress=False)


def test_layout_val_mode_holds_out_the_layouts_valid_as_test_and_carves_val_by_patient(tmp_path):
    # 12 training patients, one of them (sub-S00001) with two images; 2 held-out images (valid)
    root = make_sgseg(tmp_path / "s")
    ann = json.loads((root / "prompts" / "annotation.json").read_text())
    for i in range(6, 13):
        name = f"covid_{10 + i}"
        _pair(root / "images/train/images", root / "images/train/masks", name, i)
        ann["train"].append({"image_path": f"mask_{name}.png", "caption": _text(name)})
    (root / "prompts" / "annotation.json").write_text(json.dumps(ann))
    cache = build_cache(QataReader(root), tmp_path / "c", 8, split_mode="layout-val", progress=False)
    rows = {r["key"]: r for r in load_index(cache)}
    assert {k for k, r in rows.items() if r["split"] == "test"} == set(NAMES[6:])  # the layout's valid
    val_cases = {r["case"] for r in rows.values() if r["split"] == "val"}
    train_cases = {r["case"] for r in rows.values() if r["split"] == "train"}
    assert val_cases and not val_cases & train_cases  # by patient: sub-s00001's two images together
    assert len(val_cases) == round(12 / 8) and len(val_cases | train_cases) == 12  # train:val = 7:1
    assert rows[NAMES[4]]["split"] == rows[NAMES[5]]["split"] != "test"
    assert load_meta(cache)["counts"]["test"] == 2
    # The same seed gives the same split; another seed keeps the sizes.
    again = build_cache(QataReader(root), tmp_path / "c2", 8, split_mode="layout-val", progress=False)
    assert load_index(again) == load_index(cache)
    other = build_cache(QataReader(root), tmp_path / "c3", 8, split_mode="layout-val", seed=3,
                        progress=False)
    other_val = {r["case"] for r in load_index(other) if r["split"] == "val"}
    assert len(other_val) == len(val_cases)

    # A Kaggle layout without ID lists has no val split: layout mode stops, layout-val carves one.
    kaggle = make_kaggle(tmp_path / "k", ids=False)
    with pytest.warns(UserWarning):
        cache = build_cache(QataReader(kaggle), tmp_path / "k2", 8, split_mode="layout-val",
                            progress=False)
    counts = load_meta(cache)["counts"]
    assert counts["test"] == 2 and counts["val"] >= 1 and counts["train"] + counts["val"] == 6

    # A layout with nothing held out leaves layout-val no test split: an error that says so.
    for sub in ("images", "masks"):
        for f in (root / "images" / "valid" / sub).iterdir():
            f.unlink()
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="test split is empty.*held-out"):
        build_cache(QataReader(root), tmp_path / "c4", 8, split_mode="layout-val", progress=False)


def test_workbooks_outside_root_given_explicitly(tmp_path):
    make_kaggle(tmp_path)
    inner = tmp_path / "QaTa-COV19" / "QaTa-COV19-v2"
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="no text found for layout"):
        QataReader(inner)
    books = f"{tmp_path}/Train_text_for_Covid19.xlsx,{tmp_path}/Test_text_for_Covid19.xlsx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = QataReader(inner, text_files=books)  # the command-line form
    assert all(s.text == _text(s.key) for s in reader)


def test_auto_detection_errors_and_override(tmp_path):
    with pytest.raises(DatasetError, match=r"no QaTa-COV19 layout found.*expected"):
        QataReader(tmp_path)
    make_sgseg(tmp_path / "a")
    make_lvit(tmp_path / "b")
    with pytest.raises(DatasetError, match="several QaTa layouts"):
        QataReader(tmp_path)
    assert QataReader(tmp_path, layout="lvit").layout == "lvit"
    with pytest.raises(DatasetError, match="no QaTa-COV19 layout"):
        QataReader(tmp_path / "a", layout="kaggle")


def test_missing_text_duplicates_and_conflicts(tmp_path):
    root = make_sgseg(tmp_path / "s")
    ann = json.loads((root / "prompts" / "annotation.json").read_text())
    ann["train"] = ann["train"][1:]  # covid_1 loses its caption
    ann["valid"].append({"image_path": "covid_5.png", "caption": "a different caption"})
    (root / "prompts" / "annotation.json").write_text(json.dumps(ann))
    Image.fromarray(np.zeros((S, S), np.uint8)).save(root / "images/train/images/COVID_3.jpg")
    errors = {str(e) for e in QataReader(root) if isinstance(e, DatasetError)}
    assert any("covid_1.png: no text for this image" in e for e in errors)
    assert any("duplicate key 'covid_3'" in e for e in errors)
    assert any("annotation.json: duplicate text rows for 'covid_5'" in e for e in errors)
    assert len(errors) == 3

    with pytest.raises(DatasetError, match="covid_1.png: no text"):
        build_cache(QataReader(root), tmp_path / "c", 8, progress=False)
    # the generated caption replaces only the missing one
    samples = [s for s in QataReader(root, text_from_mask=True) if not isinstance(s, Exception)]
    assert [s.text for s in samples if s.key == "covid_1"] == [None]

    (root / "prompts" / "annotation.json").unlink()
    with pytest.raises(DatasetError, match="no text found.*text_from_mask=True"):
        QataReader(root)


def test_patient_id():
    assert patient_id("sub-S11596_ses-E21420_run-1_bp-chest_vp-ap_dx.png") == "sub-s11596"
    assert patient_id("mask_sub-s11596_ses-E1.png") == "sub-s11596"
    assert patient_id("covid_12.png") == "covid_12"


# ---------------------------------------------------------------------------- the real subset

@pytest.fixture(scope="module")
def real_reader(qata_root):
    return QataReader(qata_root)


def test_real_subset_records_and_patient_split(real_reader):
    r = real_reader
    assert r.layout == "sgseg" and len(r) == 2500
    assert Counter(r.splits.values()) == {"train": 2000, "val": 500}
    assert len(r.texts) == 2500 and all(p.key in r.texts for p in r.pairs)
    cases = [patient_id(p.image.name) for p in r.pairs]
    # the README says the train and valid subjects are disjoint
    check_no_leak([{"case": c, "split": r.splits[p.key]} for c, p in zip(cases, r.pairs)])
    split = assign_splits(cases, seed=0)
    n = len(set(cases))
    got = Counter(split.values())
    assert abs(got["train"] - 0.7 * n) <= 1 and abs(got["test"] - 0.2 * n) <= 1
    by_case = Counter(cases)
    assert max(by_case.values()) > 1  # some patients do have several images


def test_real_subset_samples_and_captions(real_reader):
    samples = [real_reader.load(p) for p in real_reader.pairs[::25]]  # 100 pairs
    sides_ok = 0
    for s in samples:
        assert s.image.shape == s.mask.shape == (224, 224)
        assert 0 <= s.image.min() < s.image.max() <= 1 and s.mask.any()
        named = [" left lung" in s.text, " right lung" in s.text]
        sides_ok += mask_zones(s.mask).any(axis=1).tolist() == named
    # QaTa's "left lung" is the image's left half: our default side convention agrees with its
    # captions (the radiological one would swap every unilateral case)
    assert sides_ok >= 95
    flipped = sum(mask_zones(s.mask, side="radiological").any(axis=1).tolist()
                  == [" left lung" in s.text, " right lung" in s.text] for s in samples)
    assert flipped < 80


def test_real_subset_cache_slice(real_reader, tmp_path):
    reader = copy.copy(real_reader)  # the fixture is shared by the module
    reader.pairs = real_reader.pairs[:150] + real_reader.pairs[-50:]
    with pytest.warns(UserWarning, match="no test split"):
        cache = build_cache(reader, tmp_path / "c", 64, split_mode="layout", progress=False)
    rows, masks = load_index(cache), np.load(cache / "masks.npy")
    assert len(rows) == 200 and masks.shape == (200, 64, 64)
    assert Counter(r["split"] for r in rows) == {"train": 150, "val": 50}
    assert all(masks[i].any() for i in range(200))


def test_an_annotation_json_that_is_a_list_is_explained(tmp_path):
    root = make_sgseg(tmp_path)
    ann = json.loads((root / "prompts" / "annotation.json").read_text())
    (root / "prompts" / "annotation.json").write_text(json.dumps(ann["train"]))  # entries, no splits
    with pytest.raises(DatasetError, match=r"annotation.json: holds a JSON list; expected an object"):
        QataReader(root)
