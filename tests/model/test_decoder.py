"""Tests of tmc/decoder.py: the dual CNN/ViT U-decoder of §3.3 (CPU, seconds)."""
import math

import pytest
import torch

from tests.model import param_counts
from tmc.decoder import DualUDecoder, DecoderWindowAttention

PAPER = dict(stage_channels=(96, 192, 384, 768), stem_channels=32, vit_heads=(3, 6, 12, 24), vit_window=7)
TINY = dict(stage_channels=(16, 32, 64, 128), stem_channels=8, vit_heads=(1, 2, 4, 8), vit_window=4)


def make_inputs(channels, B, H, W, in_chans=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, in_chans, H, W, generator=g)
    fused = [torch.randn(B, c, H // 2 ** (i + 2), W // 2 ** (i + 2), generator=g) for i, c in enumerate(channels)]
    return image, fused


# --------------------------------------------------------------------------- window attention


def slow_window_attention(attn: DecoderWindowAttention, x: torch.Tensor, window: int) -> torch.Tensor:
    """Obvious reference: loop over images, windows (clipped at the map border) and heads."""
    B, H, W, C = x.shape
    nH = attn.num_heads
    Dh = C // nH
    ws_h, ws_w = (H, W) if window == 0 else (window, window)
    out = torch.zeros(B, H, W, C, dtype=x.dtype)
    for b in range(B):
        for r0 in range(0, H, ws_h):
            for c0 in range(0, W, ws_w):
                r1, c1 = min(r0 + ws_h, H), min(c0 + ws_w, W)
                tokens = x[b, r0:r1, c0:c1].reshape(-1, C)  # (T, C)
                qkv = tokens @ attn.qkv.weight.T + attn.qkv.bias  # (T, 3C)
                q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]
                heads = []
                for h in range(nH):
                    sl = slice(h * Dh, (h + 1) * Dh)
                    scores = q[:, sl] @ k[:, sl].T / math.sqrt(Dh)  # (T, T)
                    heads.append(torch.softmax(scores, dim=-1) @ v[:, sl])  # (T, Dh)
                o = torch.cat(heads, dim=1) @ attn.proj.weight.T + attn.proj.bias  # (T, C)
                out[b, r0:r1, c0:c1] = o.reshape(r1 - r0, c1 - c0, C)
    return out


@pytest.mark.parametrize("H,W,window", [
    (8, 8, 4),  # whole windows, no padding
    (10, 9, 4),  # padded border windows (masked keys)
    (3, 5, 7),  # map smaller than the window: global
    (3, 10, 4),  # window clipped to 3 x 4 rows, columns padded to 12
    (6, 5, 0),  # window 0: global
    (14, 14, 7),  # the paper's stage-3 case at 224²
])
def test_window_attention_matches_loops(H, W, window):
    torch.manual_seed(0)
    attn = DecoderWindowAttention(dim=12, num_heads=3, window=window).double()
    with torch.no_grad():  # non-trivial biases so a q/k/v split error shows
        attn.qkv.bias.normal_()
        attn.proj.bias.normal_()
    x = torch.randn(2, H, W, 12, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, H, W, 12, dtype=torch.float64)

    fast = attn(x)
    grads_fast = torch.autograd.grad((fast * gy).sum(), [x, *attn.parameters()])
    slow = slow_window_attention(attn, x, window)
    grads_slow = torch.autograd.grad((slow * gy).sum(), [x, *attn.parameters()])

    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_window_attention_is_local():
    """A token far outside a window cannot change that window's outputs."""
    torch.manual_seed(0)
    attn = DecoderWindowAttention(dim=8, num_heads=2, window=4)
    x = torch.randn(1, 8, 8, 8)
    x2 = x.clone()
    x2[0, 7, 7] += 10.0  # bottom-right window only
    d = (attn(x) - attn(x2)).abs()
    assert d[0, :4].max() == 0 and d[0, :, :4].max() == 0
    assert d[0, 4:, 4:].max() > 0


# --------------------------------------------------------------------------- decoder


@pytest.mark.parametrize("widths,B,H,W", [
    (TINY, 2, 64, 64),  # the tiny config
    (TINY, 1, 64, 96),  # non-square: stage 3 is 4 x 6, padded to 4 x 8 for window 4
    (TINY, 1, 32, 32),  # stage 4 is 1 x 1
    (PAPER, 1, 64, 64),  # paper widths (window 7 pads 16 → 21 at stage 1)
])
def test_output_is_input_size(widths, B, H, W):
    torch.manual_seed(0)
    dec = DualUDecoder(**widths).eval()
    image, fused = make_inputs(widths["stage_channels"], B, H, W)
    with torch.no_grad():
        out = dec(image, fused)
    assert out.shape == (B, 1, H, W)
    assert torch.isfinite(out).all()


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    dec = DualUDecoder(**TINY).train()
    image, fused = make_inputs(TINY["stage_channels"], 2, 64, 64)
    target = (torch.rand(2, 1, 64, 64) > 0.5).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(dec(image, fused), target)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in dec.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_cross_modal_features_reach_the_logits():
    """Changing F_V^i at any stage changes the logits; each F_V^i gets a non-zero gradient.

    Train mode: at init the BatchNorm running statistics are the identity, so in eval mode the
    signal of deep paths fades through the untrained convolutions; batch statistics keep it."""
    torch.manual_seed(0)
    dec = DualUDecoder(**TINY).train()
    image, fused = make_inputs(TINY["stage_channels"], 2, 64, 64)
    fused = [f.requires_grad_() for f in fused]
    base = dec(image, fused)
    grads = torch.autograd.grad(base.sum(), fused)
    with torch.no_grad():
        for i in range(4):
            changed = list(fused)
            changed[i] = fused[i] + torch.randn_like(fused[i])
            assert (dec(image, changed) - base).abs().max() > 1e-4, f"F_V^{i + 1} does not reach the logits"
    for i, g in enumerate(grads):
        assert g.abs().sum() > 0, f"F_V^{i + 1} gets no gradient"


def test_vit_branch_reaches_the_logits():
    """The ViT branch matters at every stage (fused into the skips and the bottleneck)."""
    torch.manual_seed(0)
    dec = DualUDecoder(**TINY).train()  # batch statistics, as above
    image, fused = make_inputs(TINY["stage_channels"], 2, 64, 64)
    with torch.no_grad():
        base = dec(image, fused)
        for i, stage in enumerate(dec.vit):
            # rescale Ŷ_i channel by channel (a constant shift would be undone by BatchNorm)
            stage.norm.weight.copy_(torch.rand_like(stage.norm.weight) + 0.5)
            assert (dec(image, fused) - base).abs().max() > 1e-3, f"ViT stage {i + 1} is unused"
            stage.norm.weight.fill_(1.0)


def test_channels_last_and_bf16_autocast():
    torch.manual_seed(0)
    dec = DualUDecoder(**TINY).eval()
    image, fused = make_inputs(TINY["stage_channels"], 2, 64, 64)
    with torch.no_grad():
        ref = dec(image, fused)
        dec_cl = dec.to(memory_format=torch.channels_last)
        cl = [t.contiguous(memory_format=torch.channels_last) for t in (image, *fused)]
        out_cl = dec_cl(cl[0], cl[1:])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = dec_cl(cl[0], cl[1:])
    torch.testing.assert_close(out_cl, ref, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(out_bf16).all()
    assert (out_bf16.float() - ref).abs().mean() < 0.1 * ref.abs().mean() + 1e-2


def test_parameter_count_at_paper_widths():
    """The decoder's exact size at the paper's widths (about 78 M) and at the tiny preset's."""
    with torch.device("meta"):
        dec = DualUDecoder(**PAPER)
    n = sum(p.numel() for p in dec.parameters())
    assert 70e6 <= n <= 95e6, n
    # Exact, from the architecture written out layer by layer (tests/model/param_counts.py).
    assert n == param_counts.decoder(PAPER["stage_channels"], PAPER["stem_channels"]) == 78_241_121
    with torch.device("meta"):
        tiny = DualUDecoder(**TINY)
    assert sum(p.numel() for p in tiny.parameters()) == param_counts.decoder(TINY["stage_channels"],
                                                                             TINY["stem_channels"])


def test_bad_shapes_raise():
    dec = DualUDecoder(**TINY)
    image, fused = make_inputs(TINY["stage_channels"], 1, 64, 64)
    with pytest.raises(ValueError, match="divisible by 32"):
        dec(torch.randn(1, 3, 48, 64), fused)
    with pytest.raises(ValueError, match=r"image must be \(B, 3, H, W\)"):
        dec(torch.randn(1, 1, 64, 64), fused)
    with pytest.raises(ValueError, match="4 stage maps"):
        dec(image, fused[:3])
    with pytest.raises(ValueError, match=r"fused\[2\] \(F_V\^3\)"):
        dec(image, [*fused[:2], torch.randn(1, 64, 8, 8), fused[3]])
    with pytest.raises(ValueError, match="expected"):  # batch mismatch
        dec(image, [fused[0].expand(2, -1, -1, -1), *fused[1:]])
    with pytest.raises(ValueError, match="must divide"):
        DualUDecoder(stage_channels=(16, 32, 64, 128), vit_heads=(3, 2, 4, 8))
    with pytest.raises(ValueError, match="one entry per stage"):
        DualUDecoder(stage_channels=(16, 32, 64, 128), vit_heads=(1, 2, 4))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DecoderWindowAttention(dim=10, num_heads=3, window=4)


def test_batch_norm_without_its_step_counter_trains_as_torchs_in_one_op_less():
    from tmc.decoder import batch_norm
    from lab.op_count import OpCounter

    torch.manual_seed(0)
    ours, reference = batch_norm(4).train(), torch.nn.BatchNorm2d(4).train()
    for _ in range(3):
        x = torch.randn(2, 4, 5, 5) * 3 + 1
        with OpCounter() as counter:
            y = ours(x)
        torch.testing.assert_close(y, reference(x))
    torch.testing.assert_close(ours.running_mean, reference.running_mean)
    torch.testing.assert_close(ours.running_var, reference.running_var)
    assert "num_batches_tracked" not in ours.state_dict() and int(reference.num_batches_tracked) == 3
    assert not any(name == "add_" for _, _, name in counter.ops)  # no counter increment
