"""train.py when things go wrong: a read-only or full --out, bad reader settings, a start that
fails, a missing best.pt on --resume, two runs on one --out."""
import errno
import json

import pytest
import torch

import train
from datasets.records import DatasetError
from tmc import epoch_loop
from tmc.checkpoint import CheckpointWriteError, load_checkpoint, save_checkpoint
from tmc.run_folder import LOCK_NAME, RunLock
from tests.train.test_train import _argv


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_data")


def _hidden(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------- read-only --out

def test_a_read_only_out_is_named(demo_dirs, read_only_dir):
    with pytest.raises(SystemExit, match=r"--out .*read_only/run: cannot write there \(Read-only file "
                                         r"system\); fix: --out a folder you can write"):
        train.main(_argv(demo_dirs, read_only_dir / "run", 1))


def test_a_read_only_out_is_named_injected(demo_dirs, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(train, "RunLock", refuse)
    with pytest.raises(SystemExit, match=r"cannot write there \(Read-only file system\); fix: --out"):
        train.main(_argv(demo_dirs, tmp_path / "run", 1))


# ---------------------------------------------------------------------------- a full disk

def test_a_full_disk_saving_a_checkpoint_says_so_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "best.pt", {"model": {"w": torch.arange(4.0)}, "epoch": 1})
    real_save = torch.save

    def full(obj, f, *args, **kwargs):  # torch's writer turns the file's ENOSPC into a RuntimeError
        try:
            f.write(b"PK\x03\x04 part")
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointWriteError, match=r"best.pt: the disk is full; the previous best.pt is "
                                                   r"kept; fix: free space in "):
        save_checkpoint(path, {"model": {"w": torch.zeros(4)}, "epoch": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path)["epoch"] == 1 and [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_a_real_full_disk_saving_a_checkpoint(small_disk):
    save_checkpoint(small_disk / "best.pt", {"w": torch.zeros(1000), "epoch": 1})
    with pytest.raises(CheckpointWriteError, match=r"best.pt: the disk is full; the previous best.pt is kept"):
        save_checkpoint(small_disk / "best.pt", {"w": torch.zeros(400_000), "epoch": 2})  # 1.6 MB
    assert torch.load(small_disk / "best.pt")["epoch"] == 1 and _hidden(small_disk) == []


def _disk_full(message: str) -> CheckpointWriteError:
    """The error save_checkpoint raises when the disk fills (torch's chained ENOSPC read back)."""
    err = CheckpointWriteError(message)
    err.errno = errno.ENOSPC
    return err


def test_a_full_disk_during_training_stops_with_one_message(demo_dirs, tmp_path, monkeypatch):
    real = epoch_loop.save_checkpoint

    def full_on_best(path, ckpt):
        if path.name == "best.pt":
            raise _disk_full(f"{path}: the disk is full; no best.pt was written; fix: free space")
        return real(path, ckpt)

    monkeypatch.setattr(epoch_loop, "save_checkpoint", full_on_best)
    with pytest.raises(SystemExit, match=r"stopped: .*best.pt: the disk is full; no best.pt was written; "
                                         r"fix: free space; no checkpoint was saved yet: run the same "
                                         r"command again once there is room"):
        train.main(_argv(demo_dirs, tmp_path / "run", 2))
    assert list((tmp_path / "run").iterdir()) == []  # nothing half-written, nothing that blocks a rerun
    monkeypatch.setattr(epoch_loop, "save_checkpoint", real)
    calls = []

    def full_in_epoch_2(path, ckpt):  # epoch 1 writes best.pt and last.pt; the third save fails
        calls.append(path.name)
        if len(calls) == 3:
            raise _disk_full(f"{path}: the disk is full; the previous {path.name} is kept")
        return real(path, ckpt)

    monkeypatch.setattr(epoch_loop, "save_checkpoint", full_in_epoch_2)
    with pytest.raises(SystemExit, match=r"stopped: .*the disk is full.*; last.pt holds epoch 1: continue "
                                         r"with python train.py --out .*run2 --resume"):
        train.main(_argv(demo_dirs, tmp_path / "run2", 3, "--checkpoint-minutes", "0"))
    assert load_checkpoint(tmp_path / "run2" / "best.pt")["epoch"] == 1
    assert load_checkpoint(tmp_path / "run2" / "last.pt")["epoch"] == 1 and _hidden(tmp_path / "run2") == []


def test_a_real_full_disk_during_training(demo_dirs, small_disk):
    with pytest.raises(SystemExit, match=r"stopped: .*the disk is full.*fix: free space.*run the same "
                                         r"command again"):
        train.main(_argv(demo_dirs, small_disk / "run", 1))
    assert list((small_disk / "run").iterdir()) == []


# ---------------------------------------------------------------------------- failed starts

def test_a_reader_setting_the_reader_refuses_is_a_message_and_leaves_nothing(tmp_path):
    (tmp_path / "qata").mkdir()
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"--reader-options 'layout=foo': layout must be"):
        train.main(_argv(tmp_path, out, 1) + ["--dataset", "qata", "--root", str(tmp_path / "qata"),
                                              "--reader-options", "layout=foo"])
    assert list(out.iterdir()) == []


def test_a_failed_start_leaves_a_folder_a_plain_rerun_accepts(demo_dirs, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DatasetError, match=r"CSV not found"):  # train.py prints it and exits 1
        train.main(_argv(demo_dirs, out, 1) + ["--dataset", "csv", "--root", str(tmp_path / "no.csv"),
                                               "--reader-options", ""])
    assert list(out.iterdir()) == []  # no config.json: nothing says a run is here
    (out / "config.json").write_text("{}")  # as a start killed before its first checkpoint leaves them
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    result = train.main(_argv(demo_dirs, out, 1))
    assert load_checkpoint(result["best"])["epoch"] == 1
    assert json.loads((out / "config.json").read_text())["train"]["dataset"] == "demo"
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert "val_dice" in json.loads((out / "metrics.jsonl").read_text())


# ---------------------------------------------------------------------------- --resume without best.pt

def test_resume_without_best_pt_says_so_and_writes_a_new_one(demo_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(_argv(demo_dirs, out, 1))
    (out / "best.pt").unlink()
    (out / "test_metrics.json").write_text('{"dice": 0.5}\n')
    capsys.readouterr()
    train.main(_argv(demo_dirs, out, 2, "--resume"))
    said = capsys.readouterr().out
    assert "best.pt is missing: its best val Dice" in said and "next validation writes a new best.pt" in said
    assert load_checkpoint(out / "best.pt")["epoch"] == 2
    assert json.loads((out / "test_metrics.old.json").read_text()) == {"dice": 0.5}
    assert not (out / "test_metrics.json").exists()  # --no-test-at-end: no score of a deleted file


# ---------------------------------------------------------------------------- two runs, one --out

def test_a_second_train_on_a_locked_out_is_refused(demo_dirs, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lock = RunLock(out)
    try:
        with pytest.raises(SystemExit, match=r"another train.py \(pid \d+\) is writing to this run folder; "
                                             r"fix: wait for it to end, or another --out"):
            train.main(_argv(demo_dirs, out, 1))
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # nothing written beside the lock
    finally:
        lock.release()


def test_a_stale_lock_file_does_not_stop_a_run_and_the_lock_goes_at_the_end(demo_dirs, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text("999999")  # a killed run's: no process holds its lock
    train.main(_argv(demo_dirs, out, 1))
    assert not (out / LOCK_NAME).exists() and (out / "best.pt").exists()
