"""How fast can one MCM stage learn *where* a caption points? A probe without images.

The demo's captions name zones ("upper left lung and lower right lung"); TMC must turn them into a
map over the stage-2 grid, where MCM injects the text. This probe isolates that step: a text
encoder (the tiny preset's random BERT), the stage's Linear projection and one
`MultiStageCrossAttentionBlock` (with the model's 2D position code), read by a small head.

Image tokens are random features (image content that says nothing about the caption), so a token
can only learn its zone from the position code. Two ways to supervise the same map:

    dense:   every token of a named zone is labelled 1 (the zone map itself);
    lesions: only "lesion" tokens count, as in segmentation. Each named zone holds a lesion and each
             other zone one with probability 0.6 (a distractor); the head is told where lesions are
             and must say which of them the caption names. Lesions are k × k tokens.

On the first 64² demo a lesion covered about 1.4 stage-2 tokens (8 × 8 pixels each), the lesion
setting with k = 1; today's demo draws lesions of about 2 × 2 tokens (datasets/demo.py), k = 2.
`python -m lab.experiments grounding-probe` runs the settings side by side; results/README.md
says what it found.

Shape key: B batch, G grid side (8: stage 2 of a 64² image), N = G·G tokens, C channels, T tokens.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datasets.text_from_mask import caption_from_mask
from tmc.mcm import MultiStageCrossAttentionBlock, sincos_position_embedding
from tmc.metrics import confusion, global_scores
from tmc.text import TextEncoder

__all__ = ["zone_batch", "GroundingProbe", "run_probe"]

GRID = 8
# Token rows lying wholly inside each zone level of an 8-row grid (zone borders at 21.3 and 42.7
# pixels of 64 fall inside rows 2 and 5, which are left out so that no lesion straddles two zones).
_LEVEL_ROWS = ((0, 1), (3, 4), (6, 7))


def zone_batch(rng: np.random.Generator, batch: int, lesion: int | None):
    """Random captions and their target maps.

    Args:
        rng: numpy generator.
        batch: B.
        lesion: k for k × k lesion tokens, or None for dense supervision.

    Returns:
        captions (list of B str), target (B, G, G) float, lesions (B, G, G) float (all ones when dense).
    """
    captions, targets, lesions = [], [], []
    size = 64
    for _ in range(batch):
        named = rng.permutation(6)[: rng.integers(1, 5)]  # zone z = side * 3 + level
        mask = np.zeros((size, size), bool)
        target = np.zeros((GRID, GRID), np.float32)
        here = np.zeros((GRID, GRID), np.float32)
        for z in range(6):
            side, level = divmod(z, 3)
            rows, c0 = _LEVEL_ROWS[level], side * GRID // 2
            if z in named:  # a small square at the zone's centre gives the caption its zone
                cy, cx = round((level + 0.5) * size / 3), round((side + 0.5) * size / 2)
                mask[cy - 2:cy + 2, cx - 2:cx + 2] = True
            if lesion is None:
                if z in named:
                    target[rows[0]:rows[1] + 1, c0:c0 + GRID // 2] = 1
                continue
            if z in named or rng.random() < 0.6:
                r = rows[0] + (rng.integers(0, 2) if lesion == 1 else 0)
                c = c0 + rng.integers(0, GRID // 2 - lesion + 1)
                here[r:r + lesion, c:c + lesion] = 1
                if z in named:
                    target[r:r + lesion, c:c + lesion] = 1
        captions.append(caption_from_mask(mask))
        targets.append(target)
        lesions.append(here if lesion is not None else np.ones_like(here))
    return captions, torch.from_numpy(np.stack(targets)), torch.from_numpy(np.stack(lesions))


class GroundingProbe(nn.Module):
    """Text encoder → Linear → one MCM stage over G × G random image tokens → per-token logit.

    Args:
        text_model: TextEncoder name (tiny preset: "random:2x64").
        channels: C, width of the image tokens (tiny stage 2: 32).
        heads: MCM heads (tiny stage 2: 2).
        text_length: T.
    """

    def __init__(self, text_model: str = "random:2x64", channels: int = 32, heads: int = 2,
                 text_length: int = 24) -> None:
        super().__init__()
        self.channels = channels
        self.text = TextEncoder(text_model, text_length, freeze=False)
        self.text_proj = nn.Linear(self.text.hidden_size, channels)
        self.mcm = MultiStageCrossAttentionBlock(channels, channels, heads, update_text=False)
        # The head sees the token's MCM output and whether a lesion is there: "is it named?"
        self.head = nn.Sequential(nn.Linear(channels + 1, 32), nn.ReLU(), nn.Linear(32, 1))
        self.register_buffer("pos", sincos_position_embedding(GRID, GRID, channels), persistent=False)

    def forward(self, captions: list[str], lesions: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """captions (B), lesions (B, G, G) → logits (B, G, G)."""
        B = len(captions)
        tokens = self.text.tokenize(captions)
        lang = self.text_proj(self.text(tokens["input_ids"], tokens["attention_mask"]))  # (B, T, C)
        image = torch.randn(B, GRID * GRID, self.channels, generator=generator)  # (B, N, C)
        f_v, _ = self.mcm(image, lang, tokens["attention_mask"] == 0, v_pos=self.pos)  # (B, N, C)
        x = torch.cat([f_v, lesions.reshape(B, GRID * GRID, 1)], dim=-1)  # (B, N, C + 1)
        return self.head(x).reshape(B, GRID, GRID)  # (B, G, G)


def run_probe(lesion: int | None, steps: int = 1500, seed: int = 0, batch: int = 8, lr: float = 1e-3,
              eval_every: int = 250, eval_size: int = 256, text_model: str = "random:2x64") -> dict:
    """Train a GroundingProbe with Adam at the demo's lr and batch; return its Dice curve.

    Dice is global over `eval_size` fixed held-out captions, on the tokens the head must decide
    (lesion tokens; every token when dense).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    model = GroundingProbe(text_model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    eval_caps, eval_target, eval_lesions = zone_batch(np.random.default_rng(10_000 + seed), eval_size, lesion)
    curve, t0 = [], time.time()
    for step in range(1, steps + 1):
        captions, target, lesions = zone_batch(rng, batch, lesion)
        logits = model(captions, lesions, g)
        loss = F.binary_cross_entropy_with_logits(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                logits = model(eval_caps, eval_lesions, torch.Generator().manual_seed(1))
            model.train()
            # Only lesion tokens are scored: predictions elsewhere are not the head's decision.
            pred = (logits > 0) & (eval_lesions > 0)  # (B, G, G)
            dice = global_scores(*confusion(pred, eval_target > 0), empty=1.0)["dice_global"]
            curve.append({"step": step, "dice": dice, "train_loss": loss.item()})
    return {"lesion": lesion, "steps": steps, "seed": seed, "batch": batch, "lr": lr,
            "text_model": text_model, "curve": curve, "seconds": time.time() - t0}
