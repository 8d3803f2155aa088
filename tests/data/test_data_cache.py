"""datasets/cache.py, cached.py, csvset.py, registry.py and prepare.py on tiny CSV datasets."""
import csv
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from datasets.cache import build_cache
from datasets.cached import SegmentationSet, load_index, load_meta
from datasets.csvset import CsvReader
from datasets.prepare import main as prepare_main
from datasets.records import DatasetError
from datasets.registry import prepare
from datasets.text_from_mask import caption_from_mask

SIZE = 16


def _make_set(folder, n_cases=10, per_case=2, texts=True, seed=0):
    """n_cases × per_case 16x16 PNG pairs + data.csv; returns (csv path, {key: (image, mask)})."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "lab").mkdir(exist_ok=True)
    rows, arrays = [], {}
    for c in range(n_cases):
        for j in range(per_case):
            key = f"p{c:02d}_{j}"
            image = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
            mask = np.zeros((SIZE, SIZE), np.uint8)
            r, q = rng.integers(0, SIZE - 5, 2)
            mask[r:r + 5, q:q + 4] = 255
            Image.fromarray(image).save(folder / "img" / f"{key}.png")
            Image.fromarray(mask).save(folder / "lab" / f"{key}.png")
            arrays[f"img/{key}"] = (image, mask > 0)
            rows.append({"image": f"img/{key}.png", "mask": f"lab/{key}.png",
                         "text": f"lesion of {key}" if texts else "", "case": f"p{c:02d}"})
    path = folder / "data.csv"
    _write_csv(path, rows)
    return path, arrays


def _write_csv(path, rows):
    fields = list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cache_arrays_index_and_dataset(tmp_path):
    csv_path, arrays = _make_set(tmp_path / "d")
    cache = build_cache(CsvReader(csv_path), tmp_path / "c", image_size=SIZE, progress=False)
    images = np.load(cache / "images.npy", mmap_mode="r")
    masks = np.load(cache / "masks.npy", mmap_mode="r")
    rows, meta = load_index(cache), load_meta(cache)
    assert images.shape == masks.shape == (20, SIZE, SIZE) and images.dtype == np.uint8
    assert meta["counts"] == {"train": 14, "val": 2, "test": 4}  # 10 cases → 7:1:2 by case
    splits_of_case = {}
    for i, row in enumerate(rows):
        image, mask = arrays[row["key"]]
        np.testing.assert_array_equal(images[i], image)  # same size: stored bytes unchanged
        np.testing.assert_array_equal(masks[i], mask.astype(np.uint8))
        splits_of_case.setdefault(row["case"], set()).add(row["split"])
        assert row["text"] == f"lesion of {row['key'][4:]}" and not row["text_from_mask"]
    assert all(len(s) == 1 for s in splits_of_case.values())  # both images of a case together

    ds = SegmentationSet(cache, "train")
    item = ds[0]
    assert len(ds) == 14 and item["image"].shape == (1, SIZE, SIZE)
    assert item["image"].dtype.is_floating_point
    assert 0 <= item["image"].min() <= item["image"].max() <= 1
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    j = ds.indices[0]
    np.testing.assert_allclose(item["image"][0].numpy(), images[j] / 255.0, atol=1e-7)
    assert pickle.loads(pickle.dumps(ds))[3]["key"] == ds[3]["key"]  # spawn-safe
    assert sum(len(SegmentationSet(cache, s)) for s in ("train", "val", "test")) == 20


def test_resize_settings_and_stale_cache_rebuilt(tmp_path, capsys):
    csv_path, arrays = _make_set(tmp_path / "d", n_cases=5, per_case=2)
    cache = tmp_path / "c"
    build_cache(CsvReader(csv_path), cache, image_size=8, progress=False)
    masks8 = np.load(cache / "masks.npy")
    key0 = load_index(cache)[0]["key"]
    # nearest neighbour 16 → 8 takes source pixel 2i+1 (centre (i + 0.5) * 2)
    np.testing.assert_array_equal(masks8[0], arrays[key0][1][1::2, 1::2])
    stamp = (cache / "meta.json").stat().st_mtime_ns

    build_cache(CsvReader(csv_path), cache, image_size=8, progress=False)
    assert "up to date" in capsys.readouterr().out
    assert (cache / "meta.json").stat().st_mtime_ns == stamp  # reused, not rewritten

    build_cache(CsvReader(csv_path), cache, image_size=12, progress=False)
    assert "changed: settings" in capsys.readouterr().out
    assert np.load(cache / "images.npy").shape == (10, 12, 12)

    build_cache(CsvReader(csv_path), cache, image_size=SIZE, progress=False)
    first = load_index(cache)[0]["source"]
    new = np.full((SIZE, SIZE), 77, np.uint8)
    Image.fromarray(new).save(first)
    st = os.stat(first)
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later edit
    build_cache(CsvReader(csv_path), cache, image_size=SIZE, progress=False)
    assert "changed: source files" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(cache / "images.npy")[0], new)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def _break_some(folder, csv_path):
    """Three bad rows (corrupt image, size mismatch, non-binary mask) and one without a caption."""
    rows = _read_csv(csv_path)
    (folder / "img" / "p00_0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(np.zeros((SIZE + 2, SIZE), np.uint8)).save(folder / "lab" / "p01_0.png")
    grey = np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE)
    Image.fromarray(grey).save(folder / "lab" / "p02_0.png")
    rows[6]["text"] = ""  # p03_0: no caption, a valid input
    _write_csv(csv_path, rows)
    return ["p00_0.png", "p01_0.png", "p02_0.png"]


def test_bad_inputs_raise_naming_the_file_and_skip_bad_lists_them(tmp_path, capsys):
    csv_path, _ = _make_set(tmp_path / "d", n_cases=10)
    bad = _break_some(tmp_path / "d", csv_path)
    for name, expect in zip(bad, ("cannot read", "differs", "distinct values")):
        rows = [r for r in _read_csv(csv_path) if name in r["image"]]
        _write_csv(tmp_path / "one.csv", [{**r, "image": "d/" + r["image"], "mask": "d/" + r["mask"]}
                                          for r in rows])
        with pytest.raises(DatasetError, match=expect) as err:
            build_cache(CsvReader(tmp_path / "one.csv"), tmp_path / "c1", SIZE, progress=False)
        assert name in str(err.value)

    cache = build_cache(CsvReader(csv_path), tmp_path / "c", SIZE, skip_bad=True, progress=False)
    out = capsys.readouterr().out
    meta = load_meta(cache)
    assert meta["n"] == 17 and len(meta["skipped"]) == 3 and meta["no_caption"] == 1
    assert "skipped 3 bad file(s)" in out and all(name in out for name in bad)
    assert "1 of 17 samples have no caption" in out and "fix, if they should have one" in out
    assert next(r for r in load_index(cache) if r["key"] == "img/p03_0")["text"] == ""

    cache = build_cache(CsvReader(csv_path, text_from_mask=True), tmp_path / "c2", SIZE,
                        skip_bad=True, progress=False)
    row = next(r for r in load_index(cache) if r["key"] == "img/p03_0")
    assert row["text_from_mask"]
    mask = np.asarray(Image.open(tmp_path / "d" / "lab" / "p03_0.png")) > 0
    assert row["text"] == caption_from_mask(mask)


def test_duplicates_missing_columns_empty_split_and_leaks(tmp_path):
    csv_path, _ = _make_set(tmp_path / "d", n_cases=10)
    rows = _read_csv(csv_path)
    _write_csv(tmp_path / "d" / "dup.csv", rows + [rows[3]])
    with pytest.raises(DatasetError, match="dup.csv:22.*listed twice"):
        build_cache(CsvReader(tmp_path / "d" / "dup.csv"), tmp_path / "c", SIZE, progress=False)

    _write_csv(tmp_path / "d" / "nocol.csv", [{"image": r["image"], "mask": r["mask"]} for r in rows])
    with pytest.raises(DatasetError, match=r"nocol.csv: missing column\(s\) \['text'\]"):
        CsvReader(tmp_path / "d" / "nocol.csv")

    _write_csv(tmp_path / "d" / "few.csv", rows[:4])  # 2 cases: no room for val and test
    with pytest.raises(DatasetError, match="split is empty"):
        build_cache(CsvReader(tmp_path / "d" / "few.csv"), tmp_path / "c", SIZE, progress=False)

    split = ["train"] * 14 + ["val"] * 2 + ["test"] * 4
    _write_csv(tmp_path / "d" / "split.csv", [{**r, "split": s} for r, s in zip(rows, split)])
    cache = build_cache(CsvReader(tmp_path / "d" / "split.csv"), tmp_path / "c", SIZE,
                        split_mode="layout", progress=False)
    assert load_meta(cache)["counts"] == {"train": 14, "val": 2, "test": 4}
    leak = split[:]
    leak[15], leak[16] = "test", "val"  # p07_1 / p08_0: cases 7 and 8 now in two splits
    _write_csv(tmp_path / "d" / "leak.csv", [{**r, "split": s} for r, s in zip(rows, leak)])
    with pytest.raises(DatasetError, match="p07: test/val"):
        build_cache(CsvReader(tmp_path / "d" / "leak.csv"), tmp_path / "c", SIZE,
                    split_mode="layout", progress=False)
    assert load_meta(tmp_path / "c")["counts"]["train"] == 14  # the failed build left it intact


def test_prepare_and_cli(tmp_path, capsys, monkeypatch):
    csv_path, _ = _make_set(tmp_path / "d", n_cases=10)
    monkeypatch.setenv("TMC_CACHE", str(tmp_path / "caches"))
    path = prepare("csv", csv_path, image_size=8, progress=False)
    assert path.parent == tmp_path / "caches" and path.name.startswith("csv-")
    assert prepare("csv", csv_path, image_size=8, progress=False) == path
    assert prepare("csv", csv_path, image_size=12, progress=False) != path
    capsys.readouterr()
    assert prepare_main(["--dataset", "csv", "--root", str(csv_path), "--image-size", "8",
                         "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().endswith(str(path))
    assert prepare_main(["--dataset", "qata", "--root", str(tmp_path / "d"), "--no-progress"]) == 2
    assert "no QaTa-COV19 layout" in capsys.readouterr().err
    with open(tmp_path / "d" / "meta_test.json", "w") as f:
        json.dump(load_meta(path), f)  # meta is plain JSON


def test_a_csv_split_column_is_honoured_unless_paper_mode_is_asked_for(tmp_path, monkeypatch):
    from tmc.train_config import TrainConfig

    csv_path, _ = _make_set(tmp_path / "d", n_cases=10)
    rows = _read_csv(csv_path)
    wanted = {}
    for r in rows:  # cases p00-p05 train, p06-p07 val, p08-p09 test (the user's choice)
        c = int(r["case"][1:])
        r["split"] = wanted[r["image"]] = "train" if c < 6 else "val" if c < 8 else "test"
    _write_csv(csv_path, rows)
    monkeypatch.setenv("TMC_CACHE", str(tmp_path / "caches"))
    cache = prepare("csv", csv_path, image_size=8, split_mode=TrainConfig().split_mode, progress=False)
    got = {f"{r['key']}.png": r["split"] for r in load_index(cache)}
    assert got == wanted
    with pytest.warns(UserWarning, match="split column is ignored"):
        paper = prepare("csv", csv_path, image_size=8, split_mode="paper", progress=False)
    assert load_meta(paper)["counts"] == {"train": 14, "val": 2, "test": 4}  # 7:1:2 of 10 cases
