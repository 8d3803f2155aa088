"""MultiHeadCrossAttention against torch.nn.MultiheadAttention (copied weights), plus masking."""
import pytest
import torch
from torch import nn

from tmc.attention import KeyPadding, MultiHeadCrossAttention
from lab.op_count import OpCounter

DT = torch.float64  # parity in double precision: any real mismatch shows far above round-off


def _pair(q_dim=12, kv_dim=20, heads=3, seed=0):
    """Our module and an nn.MultiheadAttention (kdim = vdim = kv_dim != embed_dim) with equal weights."""
    torch.manual_seed(seed)
    ours = MultiHeadCrossAttention(q_dim, kv_dim, heads).to(DT)
    for p in ours.parameters():  # random biases too, so a dropped bias would show
        nn.init.normal_(p, std=0.3)
    ref = nn.MultiheadAttention(q_dim, heads, kdim=kv_dim, vdim=kv_dim, batch_first=True).to(DT)
    assert not ref._qkv_same_embed_dim  # separate q/k/v projection weights are in use
    with torch.no_grad():
        ref.q_proj_weight.copy_(ours.q_proj.weight)
        ref.k_proj_weight.copy_(ours.k_proj.weight)
        ref.v_proj_weight.copy_(ours.v_proj.weight)
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    return ours.eval(), ref.eval()


def _ref_grads(ref):
    E = ref.embed_dim
    b = ref.in_proj_bias.grad
    return {
        "q_proj.weight": ref.q_proj_weight.grad, "k_proj.weight": ref.k_proj_weight.grad,
        "v_proj.weight": ref.v_proj_weight.grad, "q_proj.bias": b[:E], "k_proj.bias": b[E:2 * E],
        "v_proj.bias": b[2 * E:], "out_proj.weight": ref.out_proj.weight.grad,
        "out_proj.bias": ref.out_proj.bias.grad,
    }


@pytest.mark.parametrize("masked", [False, True])
def test_matches_nn_multiheadattention_values_and_grads(masked):
    ours, ref = _pair()
    B, Nq, Nk = 3, 5, 7
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, Nq, 12, dtype=DT, generator=g)
    kv = torch.randn(B, Nk, 20, dtype=DT, generator=g)
    mask = None
    if masked:  # a different number of padding tokens per sample, none fully padded
        mask = torch.zeros(B, Nk, dtype=torch.bool)
        mask[0, 5:] = True
        mask[1, 1:] = True
        mask[2, [0, 3]] = True
    q1, kv1 = q.clone().requires_grad_(), kv.clone().requires_grad_()
    q2, kv2 = q.clone().requires_grad_(), kv.clone().requires_grad_()

    out, w = ours(q1, kv1, kv_padding_mask=mask, return_weights=True)
    out_ref, w_ref = ref(q2, kv2, kv2, key_padding_mask=mask, need_weights=True,
                         average_attn_weights=True)
    assert out.shape == (B, Nq, 12) and w.shape == (B, Nq, Nk)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-10)

    up = torch.randn(B, Nq, 12, dtype=DT, generator=g)
    (out * up).sum().backward()
    (out_ref * up).sum().backward()
    torch.testing.assert_close(q1.grad, q2.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(kv1.grad, kv2.grad, rtol=1e-9, atol=1e-10)
    ref_grads = _ref_grads(ref)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-9, atol=1e-10, msg=name)


def _slow_sigmoid_mhca(q, kv, m, pad=None):
    """Sigmoid-weighted attention written out with loops over batch and heads."""
    Q = q @ m.q_proj.weight.T + m.q_proj.bias
    K = kv @ m.k_proj.weight.T + m.k_proj.bias
    V = kv @ m.v_proj.weight.T + m.v_proj.bias
    dh = m.head_dim
    outs = []
    for b in range(q.shape[0]):
        heads = []
        for h in range(m.num_heads):
            sl = slice(h * dh, (h + 1) * dh)
            s = Q[b, :, sl] @ K[b, :, sl].T / dh ** 0.5 - torch.log(torch.tensor(kv.shape[1], dtype=DT))
            w = 1 / (1 + torch.exp(-s))  # (Nq, Nk), each key on its own
            if pad is not None:
                w = w * (~pad[b]).to(DT)
            heads.append(w @ V[b, :, sl])
        outs.append(torch.cat(heads, dim=-1))
    return torch.stack(outs) @ m.out_proj.weight.T + m.out_proj.bias


@pytest.mark.parametrize("masked", [False, True])
def test_sigmoid_weighting_matches_slow_reference_values_and_grads(masked):
    torch.manual_seed(0)
    ours = MultiHeadCrossAttention(12, 20, 3, weighting="sigmoid").to(DT)
    for p in ours.parameters():
        nn.init.normal_(p, std=0.3)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 5, 12, dtype=DT, generator=g)
    kv = torch.randn(3, 7, 20, dtype=DT, generator=g)
    mask = None
    if masked:
        mask = torch.zeros(3, 7, dtype=torch.bool)
        mask[0, 5:] = True
        mask[2, [0, 3]] = True
    out = ours(q, kv, kv_padding_mask=mask)
    slow = _slow_sigmoid_mhca(q, kv, ours, mask)
    torch.testing.assert_close(out, slow, rtol=1e-10, atol=1e-10)
    up = torch.randn(out.shape, dtype=DT, generator=g)
    params = list(ours.parameters())
    grads = torch.autograd.grad((out * up).sum(), params)
    slow_grads = torch.autograd.grad((slow * up).sum(), params)
    for (name, _), a, b in zip(ours.named_parameters(), grads, slow_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


def test_sigmoid_lets_a_query_take_two_keys_fully():
    """Why the option exists: a query matching two keys gets both at full weight, where the
    softmax must split one unit between them."""
    weights = {}
    for weighting in ("softmax", "sigmoid"):
        m = MultiHeadCrossAttention(4, 4, 1, weighting=weighting).to(DT)
        with torch.no_grad():
            for layer in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
                layer.weight.copy_(torch.eye(4, dtype=DT))
                layer.bias.zero_()
        q = torch.tensor([[[10.0, 10.0, 0.0, 0.0]]], dtype=DT)  # matches keys 0 and 1
        kv = 10 * torch.eye(4, dtype=DT)[None]  # keys 0..3 along the axes
        _, w = m(q, kv, return_weights=True)
        weights[weighting] = w[0, 0]
    # The softmax splits one unit between the two matching keys: half each.
    torch.testing.assert_close(weights["softmax"][:2], torch.full((2,), 0.5, dtype=DT))
    assert (weights["sigmoid"][:2] > 0.99).all()
    # An unrelated key (score 0) gets σ(−log N_k) = 1 / (1 + N_k), the softmax's weight at init.
    torch.testing.assert_close(weights["sigmoid"][2:], torch.full((2,), 1 / 5, dtype=DT))


@pytest.mark.parametrize("weighting", ["softmax", "sigmoid"])
def test_padding_and_empty_samples_for_both_weightings(weighting):
    m = MultiHeadCrossAttention(8, 6, 2, weighting=weighting).to(DT)
    q, kv = torch.randn(2, 3, 8, dtype=DT), torch.randn(2, 4, 6, dtype=DT)
    mask = torch.tensor([[True] * 4, [False, False, True, True]])
    out, w = m(q, kv, kv_padding_mask=mask, return_weights=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], m.out_proj.bias.expand(3, 8), rtol=0, atol=0)
    assert (w[0] == 0).all() and (w[1, :, 2:] == 0).all() and (w[1, :, :2] > 0).all()
    out_plain = m(q, kv, kv_padding_mask=mask)
    torch.testing.assert_close(out_plain, out, rtol=0, atol=0)


def test_output_without_weights_is_the_same():
    ours, _ = _pair()
    q, kv = torch.randn(2, 4, 12, dtype=DT), torch.randn(2, 6, 20, dtype=DT)
    mask = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])
    out_a = ours(q, kv, kv_padding_mask=mask)
    out_b, _ = ours(q, kv, kv_padding_mask=mask, return_weights=True)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)


def test_padded_tokens_get_exactly_zero_weight_and_do_not_matter():
    ours, _ = _pair()
    q, kv = torch.randn(2, 4, 12, dtype=DT), torch.randn(2, 6, 20, dtype=DT)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 4:] = True
    mask[1, 0] = True
    out, w = ours(q, kv, kv_padding_mask=mask, return_weights=True)
    assert (w[0, :, 4:] == 0).all() and (w[1, :, 0] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, dtype=DT))
    kv2 = kv.clone()
    kv2[mask] = 1e3 * torch.randn(int(mask.sum()), 20, dtype=DT)  # change only padded tokens
    torch.testing.assert_close(ours(q, kv2, kv_padding_mask=mask), out, rtol=0, atol=1e-12)
    # Control: without the mask the same change does move the output.
    assert not torch.allclose(ours(q, kv2), ours(q, kv))


def test_fully_padded_sample_gives_bias_without_nan():
    ours, _ = _pair()
    q = torch.randn(2, 4, 12, dtype=DT, requires_grad=True)
    kv = torch.randn(2, 6, 20, dtype=DT, requires_grad=True)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0] = True  # sample 0 has nothing to attend to
    mask[1, 5] = True
    out, w = ours(q, kv, kv_padding_mask=mask, return_weights=True)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    torch.testing.assert_close(out[0], ours.out_proj.bias.expand(4, 12), rtol=0, atol=0)
    assert (w[0] == 0).all()
    # Sample 1 is unaffected by sample 0's padding: same as running it alone.
    alone = ours(q[1:], kv[1:], kv_padding_mask=mask[1:])
    torch.testing.assert_close(out[1:], alone, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    for t in (q.grad, kv.grad, *(p.grad for p in ours.parameters())):
        assert torch.isfinite(t).all()
    assert (kv.grad[0] == 0).all()  # no key/value of the empty sample was used


@pytest.mark.parametrize("q_dim,kv_dim,heads,embed", [(8, 8, 2, None), (16, 32, 4, 24), (6, 10, 1, 4)])
def test_shapes(q_dim, kv_dim, heads, embed):
    m = MultiHeadCrossAttention(q_dim, kv_dim, heads, embed_dim=embed)
    out, w = m(torch.randn(2, 9, q_dim), torch.randn(2, 3, kv_dim), return_weights=True)
    assert out.shape == (2, 9, q_dim) and w.shape == (2, 9, 3)
    assert m.q_proj.out_features == (embed or q_dim) and m.out_proj.out_features == q_dim


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadCrossAttention(10, 8, 3)
    with pytest.raises(ValueError):
        MultiHeadCrossAttention(8, 8, 2, dropout=1.5)
    with pytest.raises(ValueError, match="weighting"):
        MultiHeadCrossAttention(8, 8, 2, weighting="relu")
    m = MultiHeadCrossAttention(8, 6, 2)
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 4, 6)
    with pytest.raises(ValueError, match="attention_mask == 0"):  # a HF 1 = token mask
        m(q, kv, kv_padding_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        m(q, kv, kv_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError):
        m(q, torch.randn(3, 4, 6))


def _explicit(q, k, v, bias):
    """softmax(q kᵀ / √Dh + bias) v, written out in float64."""
    scores = q.double() @ k.double().transpose(-2, -1) * q.shape[-1] ** -0.5 + bias.double()
    return scores.softmax(-1) @ v.double()


def test_attend_matches_the_written_out_product_with_a_learned_bias():
    """The CPU path taken when the bias needs a gradient (Swin's relative-position bias): values and
    every gradient against float64 autograd, and far fewer ops than SDPA's fallback."""
    from tmc.attention import attend
    from lab.op_count import OpCounter

    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 3, 9, 8, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 3, 9, 9, requires_grad=True)  # broadcast over the 6 windows
    g = torch.randn(6, 3, 9, 8)
    out = attend(q, k, v, bias)
    grads = torch.autograd.grad(out, (q, k, v, bias), g)
    ref = _explicit(q, k, v, bias)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(ref, (q, k, v, bias), g.double())):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)
    counts = {}
    for name, fn in (("ours", attend), ("sdpa", nn.functional.scaled_dot_product_attention)):
        inputs = [t.detach().bfloat16().requires_grad_() for t in (q, k, v, bias)]
        with OpCounter() as counter:  # in bf16 SDPA's fallback upcasts every input to fp32 and back
            torch.autograd.grad(fn(*inputs), inputs, g.bfloat16())
        counts[name] = sum(counter.ops.values())
    assert counts["ours"] < counts["sdpa"] / 2, counts


def test_attend_dropout_drops_weights_and_rescales_the_rest():
    """With v = I the output rows are the attention weights: each one 0 or w / (1 - p)."""
    from tmc.attention import attend

    torch.manual_seed(0)
    n, p = 16, 0.25
    q, k = torch.randn(2, 4, n, n), torch.randn(2, 4, n, n)
    v = torch.eye(n).expand(2, 4, n, n)
    weights = attend(q, k, v)  # no dropout: the weights themselves
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, n))
    dropped = attend(q, k, v, dropout_p=p)
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], weights[kept] / (1 - p))
    assert abs((~kept).float().mean().item() - p) < 0.05
    assert attend(q, k, v.contiguous(), dropout_p=0.0).equal(weights)


@pytest.mark.parametrize("weighting", ["softmax", "sigmoid"])
def test_a_prepared_key_padding_gives_the_bool_masks_result_in_fewer_ops(weighting):
    torch.manual_seed(0)
    m = MultiHeadCrossAttention(12, 20, 3, weighting=weighting).to(DT).eval()
    q, kv = torch.randn(3, 4, 12, dtype=DT), torch.randn(3, 6, 20, dtype=DT)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0] = True  # all padding
    mask[1, 4:] = True
    prepared = KeyPadding.from_mask(mask, DT)
    assert prepared.bias.shape == (3, 1, 1, 6) and prepared.keep.flatten().tolist() == [0.0, 1.0, 1.0]
    with OpCounter() as plain:
        out, w = m(q, kv, kv_padding_mask=mask, return_weights=True)
    with OpCounter() as ready:
        out_p, w_p = m(q, kv, kv_padding_mask=prepared, return_weights=True)
    torch.testing.assert_close(out_p, out, rtol=0, atol=0)
    torch.testing.assert_close(w_p, w, rtol=0, atol=0)
    assert (w[1, :, 4:] == 0).all() and (w[0] == 0).all()
    assert sum(ready.ops.values()) < sum(plain.ops.values())


def test_a_key_padding_of_another_batch_is_refused_with_a_fix():
    m = MultiHeadCrossAttention(12, 20, 3).to(DT)
    q, kv = torch.randn(2, 4, 12, dtype=DT), torch.randn(2, 6, 20, dtype=DT)
    other = KeyPadding.from_mask(torch.zeros(1, 6, dtype=torch.bool), DT)  # would broadcast silently
    with pytest.raises(ValueError, match="expected \\(2, 1, 1, 6\\).*fix: build it with KeyPadding.from_mask"):
        m(q, kv, kv_padding_mask=other)
