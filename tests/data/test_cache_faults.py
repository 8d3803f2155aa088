"""The cache on a full disk, a truncated copy, and a cache folder the user names for eval.py."""
import errno
import os
from types import SimpleNamespace

import numpy as np
import pytest

import eval as evaluate
from datasets.cache import build_cache
from datasets.cache_format import ArrayWriter
from datasets.cached import SegmentationSet
from datasets.csvset import CsvReader
from datasets.records import DatasetError
from tests.data.test_data_cache import SIZE, _make_set


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_full_disk_during_the_build_says_so_and_leaves_nothing(tmp_path, monkeypatch):
    """Injected ENOSPC on the frame writes and again on close (the buffer's flush)."""
    csv_path, _ = _make_set(tmp_path / "data", n_cases=10, per_case=1)

    class FullFile:
        def __init__(self, path, mode):
            self.f = open(path, mode)

        def write(self, b):
            if self.f.tell() > 200:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def close(self):
            self.f.close()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    real_init = ArrayWriter.__init__

    def init(self, path, size):
        real_init(self, path, size)
        self.f.close()
        self.f = FullFile(path, "r+b")
        self.f.seek(0, os.SEEK_END)

    monkeypatch.setattr(ArrayWriter, "__init__", init)
    out = tmp_path / "caches"
    out.mkdir()
    with pytest.raises(DatasetError, match=r"c: the disk is full while writing the cache; nothing "
                                           r"was kept; fix: free about \d+ MB there, or --cache-dir"):
        build_cache(CsvReader(csv_path), out / "c", SIZE, progress=False)
    assert list(out.iterdir()) == []


def test_a_real_full_disk_during_the_build(tmp_path, small_disk):
    csv_path, _ = _make_set(tmp_path / "data", n_cases=12, per_case=1)
    with pytest.raises(DatasetError, match=r"the disk is full while writing the cache.*fix: free"):
        build_cache(CsvReader(csv_path), small_disk / "c", 256, progress=False)  # 12 × 2 × 64 KiB
    assert list(small_disk.iterdir()) == []


def test_a_read_only_cache_folder_is_named(tmp_path, read_only_dir):
    csv_path, _ = _make_set(tmp_path / "data", n_cases=10, per_case=1)
    with pytest.raises(DatasetError, match=r"cannot write the cache \(Read-only file system\).*fix: "
                                           r"--cache-dir in a folder you can write"):
        build_cache(CsvReader(csv_path), read_only_dir / "c", SIZE, progress=False)


def test_a_truncated_cache_is_rebuilt_not_read(tmp_path, capsys):
    csv_path, _ = _make_set(tmp_path / "data", n_cases=10, per_case=1)
    cache = build_cache(CsvReader(csv_path), tmp_path / "c", SIZE, progress=False)
    whole = np.load(cache / "images.npy").copy()
    with open(cache / "images.npy", "r+b") as f:  # an interrupted copy
        f.truncate(os.path.getsize(cache / "images.npy") - SIZE * SIZE - 7)
    capsys.readouterr()
    build_cache(CsvReader(csv_path), tmp_path / "c", SIZE, progress=False)
    assert "cache up to date" not in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(cache / "images.npy"), whole)
    assert len(SegmentationSet(cache, "train")) > 0


def test_eval_does_not_rebuild_a_cache_the_user_names(tmp_path):
    csv_path, _ = _make_set(tmp_path / "data", n_cases=10, per_case=1)
    cache = build_cache(CsvReader(csv_path), tmp_path / "mine", 8, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    ckpt = {"train_config": {"dataset": "csv", "root": str(csv_path), "split_mode": "paper"}}
    args = SimpleNamespace(dataset="", root="", split_mode="auto", cache_dir=str(cache),
                           reader_options="")
    settings = evaluate.dataset_settings(ckpt, args)
    with pytest.raises(DatasetError, match=r"mine: holds a cache of other settings \(changed: settings\); "
                                           r"eval\.py leaves it as it is; fix: another --cache-dir"):
        evaluate.split_loader(settings, SIZE, "test", 2, 0, __import__("torch").device("cpu"), False)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before


def test_ctrl_c_during_prepare_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    from datasets import prepare as prepare_cli

    csv_path, _ = _make_set(tmp_path / "data", n_cases=10, per_case=1)
    real_load = CsvReader.load
    calls = []

    def load(self, row):
        calls.append(row)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_load(self, row)

    monkeypatch.setattr(CsvReader, "load", load)
    (tmp_path / "caches").mkdir()
    code = prepare_cli.main(["--dataset", "csv", "--root", str(csv_path), "--cache-dir",
                             str(tmp_path / "caches" / "c"), "--no-progress"])
    assert code == 130
    err = capsys.readouterr().err
    assert "interrupted: no cache was written" in err and "Traceback" not in err
    assert list((tmp_path / "caches").iterdir()) == []
