"""The allowed values of each choice setting of train.py and eval.py, written once as a Literal type
(see tmc/config.py: a field's Literal gives its flag's choices). They sit here, apart from the
modules that act on them (tmc/augment.py, tmc/losses.py, tmc/precision.py, datasets/), so that the
command-line configs import without torch and without the data layer."""
from __future__ import annotations

from typing import Literal

DatasetName = Literal["demo", "qata", "mosmed", "mosmedplus", "duke", "csv"]  # datasets/registry.py
SplitMode = Literal["auto", "paper", "layout", "layout-val"]  # datasets/cache.py
AugmentMode = Literal["paper", "text-consistent", "none"]  # tmc/augment.py
CaptionMode = Literal["varied", "literal"]  # datasets/captions.py
LrSchedule = Literal["plateau", "cosine", "cosine-time"]  # tmc/optim.py
SegLoss = Literal["bce", "bce+dice"]  # tmc/losses.py
AmpMode = Literal["auto", "off", "bf16", "fp16"]  # tmc/precision.py
