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
