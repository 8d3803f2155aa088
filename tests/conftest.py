import os
import sys
from pathlib import Path

import pytest

# No test may download: make transformers / huggingface_hub fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def qata_root() -> Path:
    root = SHARED / "data" / "qata"
    if not root.exists():
        pytest.skip(f"real QaTa subset not found at {root}")
    return root


def _mount_tmpfs(folder: Path, options: str) -> bool:
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                              capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _unmount(folder: Path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=20)


def _tmpfs(folder: Path, options: str, what: str, covered_by: str):
    """Yield `folder` as a mounted tmpfs, unmounted afterwards; skip where mounting is not allowed."""
    if not _mount_tmpfs(folder, options):
        pytest.skip(f"cannot mount {what} here (needs root and mount rights); the injected "
                    f"{covered_by} tests cover the same code")
    yield folder
    _unmount(folder)


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB file system (tmpfs) to fill up; skipped where mounting is not allowed."""
    yield from _tmpfs(tmp_path / "small_disk", "size=1m", "a tmpfs", "ENOSPC")


@pytest.fixture
def read_only_dir(tmp_path):
    """A real read-only file system (a tmpfs mounted ro; chmod does not stop root)."""
    yield from _tmpfs(tmp_path / "read_only", "ro,size=1m", "a read-only tmpfs", "EROFS")
