"""MultiStageCrossAttentionBlock against a slow, obvious re-implementation written here."""
import math

import pytest
import torch
from torch import nn

from tmc.mcm import MultiStageCrossAttentionBlock, sincos_position_embedding

DT = torch.float64


# ---------------------------------------------------------------- slow reference (explicit math)

def _linear(x, layer):
    return x @ layer.weight.T + layer.bias


def _layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _mlp(x, mlp):
    return _linear(_gelu(_linear(x, mlp.fc1)), mlp.fc2)


def _slow_mhca(q, kv, attn, pad=None, k_pos=0, weighting="softmax"):
    """Loops over batch and heads; softmax (or sigmoid) written out. Returns output and head-mean
    weights."""
    Q, K, V = _linear(q, attn.q_proj), _linear(kv + k_pos, attn.k_proj), _linear(kv, attn.v_proj)
    nH = attn.num_heads
    dh = Q.shape[-1] // nH
    outs, weights = [], []
    for b in range(q.shape[0]):
        heads, w_sum = [], 0
        for h in range(nH):
            sl = slice(h * dh, (h + 1) * dh)
            s = Q[b, :, sl] @ K[b, :, sl].T / math.sqrt(dh)  # (Nq, Nk)
            keep = 1.0 if pad is None else (~pad[b]).to(s.dtype)  # padded keys contribute nothing
            if weighting == "sigmoid":
                p = keep / (1 + torch.exp(-(s - math.log(s.shape[-1]))))
            else:
                e = torch.exp(s - s.max(dim=-1, keepdim=True).values) * keep
                p = e / e.sum(dim=-1, keepdim=True)
            heads.append(p @ V[b, :, sl])
            w_sum = w_sum + p
        outs.append(torch.cat(heads, dim=-1))
        weights.append(w_sum / nH)
    return _linear(torch.stack(outs), attn.out_proj), torch.stack(weights)


def _slow_block(m, v, l, pad, pos=0):
    """The block as its docstring writes it; `pos` is added to the image queries of the first
    attention and to the image keys (not values) of the second."""
    a, w = _slow_mhca(_layer_norm(v, m.v_norm_q) + pos, _layer_norm(l, m.v_norm_kv), m.v_attn, pad,
                      weighting=m.v_attn.weighting)
    v = v + a
    f_v = v + _mlp(_layer_norm(v, m.v_norm_mlp), m.v_mlp)
    if not m.update_text:
        return f_v, l, w
    a, _ = _slow_mhca(_layer_norm(l, m.l_norm_q), _layer_norm(f_v, m.l_norm_kv), m.l_attn, k_pos=pos)
    l = l + a
    f_l = l + _mlp(_layer_norm(l, m.l_norm_mlp), m.l_mlp)
    return f_v, f_l, w


def _randomised_block(vis, txt, heads, seed=0, zero_init_visual=True, update_text=True,
                      image_weighting="softmax"):
    torch.manual_seed(seed)
    m = MultiStageCrossAttentionBlock(vis, txt, heads, mlp_ratio=2.0, zero_init_visual=zero_init_visual,
                                      update_text=update_text, image_weighting=image_weighting).to(DT)
    with torch.no_grad():  # randomise everything (zeroed projections, LN affine) so no term hides
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m.eval()


def _inputs(B=2, N=6, L=5, vis=8, txt=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, N, vis, dtype=DT, generator=g)
    l = torch.randn(B, L, txt, dtype=DT, generator=g)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, 3:] = True
    pad[1, 4:] = True
    return v, l, pad


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("use_pad,use_pos,update_text,weighting", [
    (False, False, True, "softmax"), (True, False, True, "softmax"), (True, True, True, "softmax"),
    (True, True, False, "softmax"), (True, True, True, "sigmoid"), (False, True, False, "sigmoid")])
def test_matches_slow_reference_values_and_grads(use_pad, use_pos, update_text, weighting):
    m = _randomised_block(8, 12, 2, update_text=update_text, image_weighting=weighting)
    assert m.v_attn.weighting == weighting and (not update_text or m.l_attn.weighting == "softmax")
    v, l, pad = _inputs()
    pad = pad if use_pad else None
    pos = sincos_position_embedding(2, 3, 8, dtype=DT) if use_pos else None  # N = 6 tokens
    v1, l1 = v.clone().requires_grad_(), l.clone().requires_grad_()
    f_v, f_l, w = m(v1, l1, text_padding_mask=pad, return_attention=True, v_pos=pos)

    v2, l2 = v.clone().requires_grad_(), l.clone().requires_grad_()
    s_v, s_l, s_w = _slow_block(m, v2, l2, pad, pos if use_pos else 0)
    torch.testing.assert_close(f_v, s_v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f_l, s_l, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w, s_w, rtol=1e-10, atol=1e-10)

    g = torch.Generator().manual_seed(2)
    up_v, up_l = torch.randn(f_v.shape, dtype=DT, generator=g), torch.randn(f_l.shape, dtype=DT, generator=g)
    params = dict(m.named_parameters())
    grads = torch.autograd.grad((f_v * up_v).sum() + (f_l * up_l).sum(), [v1, l1, *params.values()])
    slow = torch.autograd.grad((s_v * up_v).sum() + (s_l * up_l).sum(), [v2, l2, *params.values()])
    names = ["v", "l", *params]
    for name, a, b in zip(names, grads, slow):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
        assert torch.isfinite(a).all() and a.abs().sum() > 0, name  # every parameter is used
    if not update_text:
        assert not any(n.startswith("l_") for n in params)  # image direction only
        torch.testing.assert_close(f_l, l1, rtol=0, atol=0)


def test_position_code_is_a_fixed_grid_code():
    pe = sincos_position_embedding(3, 4, 16)
    assert pe.shape == (12, 16)
    rows, cols = pe.view(3, 4, 16)[..., :8], pe.view(3, 4, 16)[..., 8:]
    # the first half depends on the row only, the second on the column only
    torch.testing.assert_close(rows, rows[:, :1].expand(3, 4, 8))
    torch.testing.assert_close(cols, cols[:1].expand(3, 4, 8))
    # every position gets its own code; row 0 is sin(0)=0 / cos(0)=1
    assert torch.cdist(pe, pe).add(torch.eye(12) * 10).min() > 1e-3
    torch.testing.assert_close(rows[0, 0], torch.tensor([0.0] * 4 + [1.0] * 4))
    with pytest.raises(ValueError):
        sincos_position_embedding(2, 2, 6)


@pytest.mark.parametrize("vis,txt,heads,N,L", [(8, 8, 1, 4, 3), (12, 24, 3, 10, 7), (32, 16, 4, 49, 10)])
def test_shapes(vis, txt, heads, N, L):
    m = MultiStageCrossAttentionBlock(vis, txt, heads)
    f_v, f_l, w = m(torch.randn(2, N, vis), torch.randn(2, L, txt), return_attention=True)
    assert f_v.shape == (2, N, vis) and f_l.shape == (2, L, txt) and w.shape == (2, N, L)
    assert len(m(torch.randn(2, N, vis), torch.randn(2, L, txt))) == 2


def test_padded_text_tokens_do_not_change_f_v():
    m = _randomised_block(8, 12, 2)
    v, l, pad = _inputs()
    f_v, _, w = m(v, l, text_padding_mask=pad, return_attention=True)
    assert (w[pad[:, None, :].expand_as(w)] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:2], dtype=DT))
    l2 = l.clone()
    l2[pad] = 50 * torch.randn(int(pad.sum()), 12, dtype=DT)
    f_v2, _ = m(v, l2, text_padding_mask=pad)
    torch.testing.assert_close(f_v2, f_v, rtol=0, atol=1e-12)
    # Control: the same change on an unpadded token does move f_v.
    l3 = l.clone()
    l3[0, 0] = 5 * torch.randn(12, dtype=DT)  # not a constant shift: LayerNorm would remove it
    assert not torch.allclose(m(v, l3, text_padding_mask=pad)[0], f_v)


def test_zero_init_visual_is_identity_but_trainable():
    torch.manual_seed(0)
    m = MultiStageCrossAttentionBlock(8, 12, 2)
    v, l, pad = _inputs()
    f_v, f_l = m(v.float(), l.float(), text_padding_mask=pad)
    assert torch.equal(f_v, v.float())  # a pretrained Swin feature passes untouched at step 0
    assert not torch.allclose(f_l, l.float())  # the text path is live from the start
    (f_v.square().sum() + f_l.sum()).backward()
    assert m.v_attn.out_proj.weight.grad.abs().sum() > 0
    assert m.v_mlp.fc2.weight.grad.abs().sum() > 0
    m2 = MultiStageCrossAttentionBlock(8, 12, 2, zero_init_visual=False)
    assert not torch.allclose(m2(v.float(), l.float())[0], v.float())


def test_dropout_acts_in_train_mode_and_not_in_eval():
    """Against the same weights without dropout: in train mode dropout changes both streams (and
    differs between calls); in eval mode the block equals its dropout-free copy exactly."""
    torch.manual_seed(0)
    m = MultiStageCrossAttentionBlock(8, 8, 2, dropout=0.5, zero_init_visual=False)
    ref = MultiStageCrossAttentionBlock(8, 8, 2, dropout=0.0, zero_init_visual=False)
    ref.load_state_dict(m.state_dict())
    ref.eval()
    v, l = torch.randn(2, 6, 8), torch.randn(2, 5, 8)
    with torch.no_grad():
        want_v, want_l = ref(v, l)
        m.train()
        a_v, a_l = m(v, l)
        b_v, _ = m(v, l)
        assert torch.isfinite(a_v).all() and torch.isfinite(a_l).all()
        assert not torch.allclose(a_v, want_v) and not torch.allclose(a_l, want_l)
        assert not torch.allclose(a_v, b_v)  # a fresh mask per call
        m.eval()
        got_v, got_l = m(v, l)
    torch.testing.assert_close(got_v, want_v, rtol=0, atol=0)
    torch.testing.assert_close(got_l, want_l, rtol=0, atol=0)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="vis_dim"):
        MultiStageCrossAttentionBlock(10, 8, 4)
    with pytest.raises(ValueError, match="txt_dim"):
        MultiStageCrossAttentionBlock(8, 10, 4)
    m = MultiStageCrossAttentionBlock(8, 8, 2)
    with pytest.raises(ValueError):
        m(torch.randn(2, 4, 8), torch.randn(3, 5, 8))
