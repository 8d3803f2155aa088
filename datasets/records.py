"""What every dataset reader yields, whatever the layout on disk.

A reader walks a user's folder and yields one `Sample` per 2D image or per axial slice. The cache
builder (`datasets/cache.py`) resizes each sample once and stores it as uint8; training and
evaluation read only the cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np


class DatasetError(ValueError):
    """A problem with the user's files. The message names the file and what was expected."""


@dataclass
class Sample:
    key: str  # unique within the dataset (image stem, or "<case>#<slice>")
    image: np.ndarray  # (H, W) float32 in [0, 1]
    mask: np.ndarray  # (H, W) bool
    text: str | None  # None: generated from the mask by the cache builder (chest template)
    case: str  # patient / study id: the unit that never crosses splits
    split: str | None = None  # the layout's own split ("train", "val", "test"), if it has one
    stratum: str = ""  # stratification label (severity grade, lesion type)
    slice_index: int = -1  # axial slice index for volumes, -1 for 2D images
    source: str = ""  # file(s) it came from, for messages and the index
    # The reader wrote `text` from the mask with its dataset's own template (e.g. Duke's breast one).
    text_from_mask: bool = False


class Reader(Protocol):
    """A dataset layout. `sources()` lists the files whose names, sizes and times key the cache."""

    name: str

    def sources(self) -> list[Path]: ...

    def options(self) -> dict: ...  # reader settings that change the samples (they key the cache too)

    def __len__(self) -> int: ...  # number of images or volumes, for the progress bar

    def __iter__(self) -> Iterator[Sample]: ...
