"""Losses against slow, per-pair / per-pixel versions written here, plus their key properties."""
import math

import pytest
import torch
import torch.nn.functional as F

from tmc.losses import (caption_positive_mask, literal_alignment_loss, multistage_alignment_loss,
                        segmentation_loss, sigmoid_alignment_loss, soft_dice_loss)

DT = torch.float64


# ---------------------------------------------------------------- slow references

def _cos(a, b):
    return (a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum())


def _slow_sigmoid_loss(img, txt, scale, bias, positive):
    B = img.shape[0]
    total = 0.0
    for i in range(B):
        for j in range(B):
            z = _cos(img[i], txt[j]) * torch.exp(scale) + bias
            y = 1.0 if positive[i][j] else -1.0
            total = total - torch.log(1.0 / (1.0 + torch.exp(-y * z)))
    return total / B


def _slow_literal_loss(img, txt, scale):
    B = img.shape[0]
    total = 0.0
    for b in range(B):
        s = 1.0 / (1.0 + torch.exp(-_cos(img[b], txt[b]) * torch.exp(scale)))
        total = total - torch.log(s) - torch.log(1.0 - s)
    return total / B


def _slow_dice(logits, target, eps=1.0):
    losses = []
    for b in range(logits.shape[0]):
        p = 1.0 / (1.0 + torch.exp(-logits[b]))
        losses.append(1 - (2 * (p * target[b]).sum() + eps) / (p.sum() + target[b].sum() + eps))
    return sum(losses) / len(losses)


def _leaves(*ts):
    return [t.clone().requires_grad_() for t in ts]


def _emb(B=4, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, dtype=DT, generator=g), torch.randn(B, D, dtype=DT, generator=g)


# ---------------------------------------------------------------- alignment

def _assert_same_values_and_grads(loss, slow, leaves, slow_leaves):
    """The loss equals the slow reference, and so do the gradients of every input leaf."""
    torch.testing.assert_close(loss, slow, rtol=1e-10, atol=1e-12)
    loss.backward()
    slow.backward()
    for x, y in zip(leaves, slow_leaves):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("with_mask", [False, True])
def test_sigmoid_loss_matches_slow_values_and_grads(with_mask):
    img, txt = _emb()
    scale, bias = torch.tensor(math.log(10.0), dtype=DT), torch.tensor(-2.0, dtype=DT)
    mask = None
    positive = torch.eye(4, dtype=torch.bool)
    if with_mask:
        mask = caption_positive_mask(["a", "b", "A", "c"])
        positive = mask
    a = _leaves(img, txt, scale, bias)
    b = _leaves(img, txt, scale, bias)
    loss = sigmoid_alignment_loss(*a, positive_mask=mask)
    assert loss.ndim == 0
    _assert_same_values_and_grads(loss, _slow_sigmoid_loss(*b, positive.tolist()), a, b)


def test_identical_captions_are_positives():
    m = caption_positive_mask(["Bilateral  infection.", "bilateral infection. ", "left lung", "x"])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)
    # Two images sharing one caption, both aligned with it: the masked loss does not push the
    # cross pair apart, the default (diagonal) one does.
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=DT)
    txt = img.clone()
    s, b = torch.tensor(math.log(10.0), dtype=DT), torch.tensor(0.0, dtype=DT)
    same = caption_positive_mask(["a", "a"])
    assert sigmoid_alignment_loss(img, txt, s, b, same) < sigmoid_alignment_loss(img, txt, s, b)
    with pytest.raises(ValueError, match="caption 1"):
        caption_positive_mask(["a", None])


def test_sigmoid_loss_falls_as_matched_pairs_align():
    B, D = 4, 12
    basis, _ = torch.linalg.qr(torch.randn(D, D, dtype=DT, generator=torch.Generator().manual_seed(3)))
    img = basis[:B]  # orthonormal images
    start = basis[B:2 * B]  # captions start orthogonal to every image
    s, b = torch.tensor(math.log(10.0), dtype=DT), torch.tensor(-1.0, dtype=DT)
    losses = [float(sigmoid_alignment_loss(img, (1 - t) * start + t * img, s, b))
              for t in torch.linspace(0, 1, 11)]
    assert all(x > y for x, y in zip(losses, losses[1:])), losses


def test_literal_loss_matches_slow_values_and_grads():
    img, txt = _emb(B=5, seed=4)
    scale = torch.tensor(1.5, dtype=DT)
    a, b = _leaves(img, txt, scale), _leaves(img, txt, scale)
    _assert_same_values_and_grads(literal_alignment_loss(*a), _slow_literal_loss(*b), a, b)


def test_literal_loss_is_minimal_at_orthogonal_pairs():
    scale = torch.tensor(math.log(5.0), dtype=DT)
    angles = torch.linspace(0.05, math.pi - 0.05, 41, dtype=DT)
    img = torch.tensor([[1.0, 0.0]], dtype=DT)
    cos, vals, slopes = [], [], []
    for th in angles:
        th = th.clone().requires_grad_()
        txt = torch.stack([torch.cos(th), torch.sin(th)])[None]
        loss = literal_alignment_loss(img, txt, scale)
        (d_dth,) = torch.autograd.grad(loss, th)
        cos.append(float(torch.cos(th.detach())))
        vals.append(float(loss.detach()))
        slopes.append(-float(d_dth) / math.sin(float(th.detach())))  # d loss / d cos = (d/dθ) / (-sin θ)
    k = min(range(len(vals)), key=vals.__getitem__)
    assert abs(cos[k]) < 0.05  # minimum at s = 0
    assert vals[k] == pytest.approx(2 * math.log(2), abs=1e-2)
    assert all(sl < 0 for c, sl in zip(cos, slopes) if c < -1e-6)  # falls towards s = 0 ...
    assert all(sl > 0 for c, sl in zip(cos, slopes) if c > 1e-6)  # ... and rises after it


def test_multistage_averages_stages():
    stages = []
    for k in range(3):
        img, txt = _emb(seed=10 + k)
        stages.append({"img": img, "txt": txt, "logit_scale": torch.tensor(0.5 * k, dtype=DT),
                       "logit_bias": torch.tensor(-float(k), dtype=DT)})
    mask = caption_positive_mask(["a", "a", "b", "c"])
    expected = sum(sigmoid_alignment_loss(s["img"], s["txt"], s["logit_scale"], s["logit_bias"], mask)
                   for s in stages) / 3
    torch.testing.assert_close(multistage_alignment_loss(stages, "sigmoid", mask), expected)
    expected = sum(literal_alignment_loss(s["img"], s["txt"], s["logit_scale"]) for s in stages) / 3
    torch.testing.assert_close(multistage_alignment_loss(stages, "literal"), expected)


def test_multistage_empty_is_grad_safe_zero():
    z = multistage_alignment_loss([], device="cpu")
    assert z.ndim == 0 and z.item() == 0.0 and z.device.type == "cpu" and z.requires_grad
    x = torch.ones(2, requires_grad=True)
    (x.sum() + 0.1 * z).backward()  # adds to the segmentation loss without complaint
    multistage_alignment_loss([]).backward()  # and alone as well


def test_alignment_bad_arguments_raise():
    img, txt = _emb()
    s = {"img": img, "txt": txt, "logit_scale": torch.tensor(0.0)}
    with pytest.raises(ValueError, match="logit_bias"):
        multistage_alignment_loss([s])
    with pytest.raises(ValueError, match="form"):
        multistage_alignment_loss([], form="cosine")
    with pytest.raises(ValueError):
        sigmoid_alignment_loss(img, txt[:3], torch.tensor(0.0), torch.tensor(0.0))
    with pytest.raises(ValueError, match="positive_mask"):
        sigmoid_alignment_loss(img, txt, torch.tensor(0.0), torch.tensor(0.0), torch.eye(4))


# ---------------------------------------------------------------- segmentation

def _seg_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(3, 1, 5, 6, dtype=DT, generator=g)
    target = (torch.rand(3, 1, 5, 6, generator=g) > 0.6).to(DT)
    target[2] = 0  # one empty mask
    return logits, target


def test_bce_equals_torch_and_hand_formula():
    logits, target = _seg_batch()
    p = torch.sigmoid(logits)
    hand = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()  # §3.4, N = B*H*W
    loss = segmentation_loss(logits, target)
    torch.testing.assert_close(loss, hand, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, F.binary_cross_entropy(p, target), rtol=1e-10, atol=1e-12)


def test_soft_dice_matches_slow_values_and_grads():
    logits, target = _seg_batch(1)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss, slow = soft_dice_loss(a, target), _slow_dice(b, target)
    torch.testing.assert_close(loss, slow, rtol=1e-10, atol=1e-12)
    loss.backward()
    slow.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)
    both = segmentation_loss(logits, target, kind="bce+dice")
    torch.testing.assert_close(both, segmentation_loss(logits, target) + soft_dice_loss(logits, target))


def test_perfect_prediction_gives_near_zero_dice_loss():
    _, target = _seg_batch(2)
    logits = (target * 2 - 1) * 30.0  # confident and right, including the empty mask
    assert float(soft_dice_loss(logits, target)) < 1e-9
    assert float(segmentation_loss(logits, target)) < 1e-9
    wrong = -logits
    assert float(soft_dice_loss(wrong, target)) > 0.5


def test_segmentation_bad_arguments_raise():
    logits, target = _seg_batch()
    with pytest.raises(ValueError, match="kind"):
        segmentation_loss(logits, target, kind="dice")
    with pytest.raises(ValueError, match="differ"):
        segmentation_loss(logits, target[:, :, :4])
