"""TMC assembled: Swin-T image encoder, BERT text encoder, MCM at selected stages, alignment heads,
dual CNN/ViT U-decoder (paper Fig. 1). `build_model(cfg)` is the only place that reads the config.

Data flow for one image-text pair (stages i = 1..4, MCM and alignment at S = cfg.mcm_stages):

    image ─ Swin stage 1 ─ V_1 ───────────────────────────────────────────────┐
                  │                                                          │
            Swin stage i ─ V_i ─┬─ alignment: z_V = GAP(Linear(V_i)), z_L = Linear(CLS_i)
                  ▲             └─ MCM_i(V_i, L_i) ─ F_V^i ─┬─ replaces V_i as Swin stage i+1's input
                  │                        │                └─ decoder skip at scale i ─┐
                  └────────────────────────┘                                         ▼
    text ─ BERT ─ L ─ Linear_i ─ L_i ─ MCM_i ─ F_L^i ─ Linear_{i+1} ─ L_{i+1} …   U-decoder ─ logits

BERT runs once; L_i = Linear_i(previous language features): BERT's output up to the first MCM
stage, F_L^{i-1} after it. CLS_i = L_i[:, 0], so alignment at stage i sees the text as refined by
the earlier stages.

Shapes: B batch, C_i channels of stage i, H_i × W_i its map, N_i = H_i·W_i image tokens,
T text tokens, d_l BERT width, D alignment width.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from tmc.attention import KeyPadding
from tmc.config import ModelConfig
from tmc.decoder import DualUDecoder
from tmc.mcm import MultiStageCrossAttentionBlock
from tmc.swin import SwinTransformer
from tmc.swin_weights import load_swin_weights
from tmc.text import TextEncoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class AlignmentHead(nn.Module):
    """Projects V_i and CLS_i into a common space of size D, with a learnable temperature and bias.

    logit_scale = log(1/τ_i) starts at log 10 (SigLIP). logit_bias starts at the log prior odds of a
    positive pair at the paper's batch of 8, −log 7 (SigLIP's −10 is that for 32k batches; here it
    would make matched pairs look wrong for many steps and fight the segmentation loss).
    """

    INIT_BIAS = -math.log(7.0)  # log prior odds of a positive pair at batch size 8

    def __init__(self, vis_dim: int, txt_dim: int, dim: int):
        super().__init__()
        self.img_proj = nn.Linear(vis_dim, dim)
        self.txt_proj = nn.Linear(txt_dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(self.INIT_BIAS))

    def forward(self, v: torch.Tensor, cls: torch.Tensor) -> dict:
        """v (B, N, C) visual tokens, cls (B, C_t) → {"img": (B, D), "txt": (B, D), scale, bias}."""
        img = self.img_proj(v).mean(dim=1)  # GAP over the N tokens of Linear(V_i): (B, D)
        # Scale and bias leave through an op (× 1), not as the Parameters themselves: DDP only
        # tracks parameters that reach the outputs through the autograd graph.
        return {"img": img, "txt": self.txt_proj(cls), "logit_scale": self.logit_scale * 1,
                "logit_bias": self.logit_bias * 1}


class TMC(nn.Module):
    """Text-guided multi-stage cross-perception network.

    Args:
        swin: image encoder with `forward_stage(i, x)`.
        text: language encoder, or None for the image-only ablation.
        text_proj: {str(i): Linear} stage-specific language projections L_i (MCM and alignment stages).
        mcm: {str(i): MultiStageCrossAttentionBlock} at the MCM stages.
        align: {str(i): AlignmentHead} at the alignment stages.
        decoder: the dual CNN/ViT U-decoder.
        alignment_text_grad: False keeps the alignment loss's gradient out of the language stream.
        alignment_through_mcm: False stops the alignment loss's gradient at every MCM block (it
            reads detached inputs at stages after an MCM).
    """

    def __init__(self, swin: SwinTransformer, text: TextEncoder | None, text_proj: nn.ModuleDict,
                 mcm: nn.ModuleDict, align: nn.ModuleDict, decoder: DualUDecoder, num_stages: int = 4,
                 alignment_text_grad: bool = True, alignment_through_mcm: bool = False):
        super().__init__()
        self.alignment_text_grad = alignment_text_grad
        self.alignment_through_mcm = alignment_through_mcm
        self.swin, self.text, self.decoder = swin, text, decoder
        self.text_proj, self.mcm, self.align = text_proj, mcm, align
        self.num_stages = num_stages
        # Derived constants: not learned, so not saved in checkpoints.
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Captions → {"input_ids", "attention_mask"} (B, T), and "text_features" (B, T, d_l) when the
        text encoder is frozen (computed once per distinct caption); {} for the image-only model."""
        if self.text is None:
            return {}
        tokens = self.text.tokenize(captions)
        if self.text.freeze:
            tokens["text_features"] = self.text.cached_features(list(captions), tokens)
        return tokens

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1 or 3, H, W) in [0, 1] → (B, 3, H, W) ImageNet-normalised (what Swin weights expect)."""
        if image.shape[1] == 1:
            image = image.expand(-1, 3, -1, -1)
        elif image.shape[1] != 3:
            raise ValueError(f"image must have 1 or 3 channels, got shape {tuple(image.shape)}")
        return (image - self.pixel_mean) / self.pixel_std

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, text_features: torch.Tensor | None = None,
                return_attention: bool = False) -> dict:
        """
        Args:
            image: (B, 1 or 3, H, W) in [0, 1].
            input_ids, attention_mask: (B, T) from `tokenize`; required unless the model is image-only.
            text_features: (B, T, d_l) the frozen encoder's output for these tokens (from `tokenize`);
                None runs the encoder.
            return_attention: also return the text→image attention of every MCM stage.
        Returns:
            {"logits": (B, 1, H, W), "alignment": [per-stage dicts for tmc.losses],
             "attention": {i: (B, N_i, T)} when asked}
        """
        x = self.normalize(image)
        lang = pad = None
        if self.text is not None:
            if input_ids is None or attention_mask is None:
                raise ValueError("this TMC model is text-guided: pass input_ids and attention_mask "
                                 "(model.tokenize(captions))")
            lang = self.text(input_ids, attention_mask) if text_features is None else text_features  # (B, T, d_l)
            # once for every MCM stage: (B, 1, 1, T) additive mask, 0 on tokens, -inf on padding
            pad = KeyPadding.from_mask(attention_mask == 0, lang.dtype)

        alignment, attention, fused = [], {}, []
        text_fused = False
        h = x
        for i in range(1, self.num_stages + 1):
            h = self.swin.forward_stage(i, h)  # (B, C_i, H_i, W_i)
            if i == self.num_stages:  # Swin's final LayerNorm, as its pretrained head consumes stage 4
                h = self.swin.norm(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, C_4, H_4, W_4)
            key = str(i)
            if key in self.text_proj:
                B, C, H, W = h.shape
                v = h.flatten(2).transpose(1, 2)  # (B, N_i, C_i)
                lang_i = self.text_proj[key](lang)  # L_i: (B, T, C_i)
                if key in self.align:  # before cross-attention (§3.2)
                    v_a, cls = v, lang_i[:, 0]  # (B, N_i, C_i), (B, C_i)
                    if text_fused and not self.alignment_through_mcm:
                        v_a, cls = v_a.detach(), cls.detach()
                    if not self.alignment_text_grad:
                        cls = cls.detach()
                    alignment.append(self.align[key](v_a, cls))
                if key in self.mcm:
                    pos = self.mcm[key].pos_code(H, W, v.dtype)  # (N_i, C_i), built once per grid
                    out = self.mcm[key](v, lang_i, pad, return_attention=return_attention, v_pos=pos)
                    f_v, lang = out[0], out[1]  # F_V^i (B, N_i, C_i), F_L^i (B, T, C_i)
                    text_fused = True  # later stages' image tokens carry the caption
                    if return_attention:
                        attention[i] = out[2]  # (B, N_i, T)
                    # A view with channels-last strides: Swin and the decoder read it without a copy.
                    h = f_v.view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C_i, H_i, W_i)
            fused.append(h)

        result = {"logits": self.decoder(x, fused), "alignment": alignment}
        if return_attention:
            result["attention"] = attention
        return result


def build_model(cfg: ModelConfig, load_pretrained: bool = True, text_config: dict | None = None) -> TMC:
    """Build TMC from its config.

    Args:
        load_pretrained: load the text encoder's pretrained weights and cfg.swin_weights. False builds
            the architecture only, for weights that come from a TMC checkpoint.
        text_config: the BERT architecture saved in a checkpoint (used when not loading weights).
    """
    channels = cfg.stage_channels
    swin = SwinTransformer(
        img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim, depths=cfg.depths, num_heads=cfg.num_heads,
        window_size=cfg.window_size, mlp_ratio=cfg.mlp_ratio, drop_path_rate=cfg.drop_path_rate,
    )
    if load_pretrained and cfg.swin_weights:
        load_swin_weights(swin, cfg.swin_weights)

    text = None
    text_proj, mcm, align = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
    if cfg.use_text:
        text = TextEncoder(cfg.text_model, cfg.text_length, cfg.freeze_text,
                           load_pretrained=load_pretrained, bert_config=text_config,
                           sentence=cfg.text_sentence)
        lang_dim = text.hidden_size  # width of the language stream entering the next stage
        for i in sorted(set(cfg.active_mcm_stages) | set(cfg.active_alignment_stages)):
            c = channels[i - 1]
            text_proj[str(i)] = nn.Linear(lang_dim, c)
            if i in cfg.active_mcm_stages:
                last = i == max(cfg.active_mcm_stages)  # its F_L would have no consumer
                mcm[str(i)] = MultiStageCrossAttentionBlock(c, c, cfg.num_heads[i - 1], cfg.mcm_mlp_ratio,
                                                            update_text=not last,
                                                            image_weighting=cfg.mcm_attention,
                                                            grid=(cfg.stage_grids[i - 1],) * 2)
                lang_dim = c  # F_L^i feeds the next stage's projection

    decoder = DualUDecoder(
        stage_channels=channels, in_chans=3, stem_channels=cfg.decoder_stem_channels,
        vit_depth=cfg.decoder_vit_depth, vit_heads=cfg.decoder_vit_heads, vit_window=cfg.decoder_vit_window,
    )
    # Built last, so that switching the alignment loss on or off leaves every other module's
    # initial weights unchanged (same seed): an alignment ablation then differs in that loss alone.
    for i in cfg.active_alignment_stages:
        c = channels[i - 1]
        align[str(i)] = AlignmentHead(c, c, cfg.alignment_dim)
    return TMC(swin, text, text_proj, mcm, align, decoder, num_stages=len(cfg.depths),
               alignment_text_grad=cfg.alignment_text_grad, alignment_through_mcm=cfg.alignment_through_mcm)


def count_parameters(model: TMC) -> dict[str, int]:
    """Number of parameters per part and in total."""
    def n(m):
        return sum(p.numel() for p in m.parameters()) if m is not None else 0

    parts = {
        "text_encoder": n(model.text),
        "swin": n(model.swin),
        "mcm": n(model.mcm) + n(model.text_proj),
        "alignment": n(model.align),
        "decoder": n(model.decoder),
    }
    parts["total"] = n(model)
    return parts
