"""Dataset readers, the preprocessing cache and training-time augmentation (see datasets/*.py).

    reader (datasets/qata.py, csvset.py, demo.py, mosmed.py, duke.py)
        → build_cache (datasets/cache.py: uint8 arrays + index.json + meta.json)
        → SegmentationSet (datasets/cached.py) → augment_batch (tmc/augment.py, training only)

`prepare(name, root, ...)` in datasets/registry.py runs the first two steps. Importing this package
does not import torch.
"""
from datasets.records import DatasetError, Reader, Sample
from datasets.registry import DATASETS, make_reader, prepare

__all__ = ["DatasetError", "Reader", "Sample", "DATASETS", "make_reader", "prepare"]
