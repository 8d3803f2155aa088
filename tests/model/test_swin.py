"""Swin encoder (tmc/swin.py) and weight loader (tmc/swin_weights.py).

References: transformers.SwinModel with our random weights copied in by module attributes (parity,
style.md §5.4), transformers' own save_pretrained files (4.x Hub names), timm/official state dicts
built here by renaming, and slow loop versions of the window helpers.
"""
import contextlib
import copy

import pytest
import torch
import torch.nn as nn

from tmc.config import tiny_config
from tmc.swin import (DropPath, PatchMerging, SwinTransformer, ShiftedWindowAttention, merge_2x2,
                      relative_position_index, shift_attention_mask)
from tmc.layers import to_window_heads
from tmc.swin_weights import load_swin_weights

SWIN_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7)
SMALL = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=7)
TOL = dict(atol=1e-4, rtol=1e-4)


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random rel-pos tables, LayerNorm affines and biases: HF inits tables to 0 and LN to 1/0, so
    a wrong index or a swapped norm would otherwise still match. Linear weights (trunc-normal .02)
    are scaled to std 1/sqrt(fan_in) so attention is far from uniform and a q/k mix-up shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.Linear):
                m.weight.mul_(1 / (0.02 * m.in_features**0.5))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, ShiftedWindowAttention):
                t = m.relative_position_bias_table
                t.copy_(torch.randn(t.shape, generator=g))
    return model.eval()


def poison(model: nn.Module) -> nn.Module:
    """Set every parameter to NaN: any tensor a loader forgets poisons the output."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return model


def nan_copy(model: nn.Module) -> nn.Module:
    return poison(copy.deepcopy(model))


def to_hf(ours: SwinTransformer, transformers):
    """A SwinModel holding our weights, copied module by module (independent of the loader)."""
    cfg = transformers.SwinConfig(**ours.hf_config, drop_path_rate=0.0)
    try:  # skip HF's own init: every parameter is overwritten (and checked) below
        from transformers.initialization import no_init_weights
    except ImportError:
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        hf = transformers.SwinModel(cfg).eval()
    hf.set_attn_implementation("eager")  # explicit softmax(QK^T*scale + bias): independent of SDPA
    for p in hf.parameters():
        p.data.fill_(float("nan"))
    pairs = [(hf.embeddings.patch_embeddings.projection, ours.patch_embed.proj),
             (hf.embeddings.norm, ours.patch_embed.norm), (hf.layernorm, ours.norm)]
    with torch.no_grad():
        for lo, lh in zip(ours.layers, hf.encoder.layers, strict=True):
            for bo, bh in zip(lo.blocks, lh.blocks, strict=True):
                pairs += [(bh.layernorm_before, bo.norm1), (bh.attention.o_proj, bo.attn.proj),
                          (bh.layernorm_after, bo.norm2), (bh.mlp.fc1, bo.mlp.fc1), (bh.mlp.fc2, bo.mlp.fc2)]
                a = bh.attention
                for p in ("weight", "bias"):
                    q, k, v = getattr(bo.attn.qkv, p).chunk(3, dim=0)
                    getattr(a.q_proj, p).copy_(q), getattr(a.k_proj, p).copy_(k), getattr(a.v_proj, p).copy_(v)
                a.relative_position_bias.relative_position_bias_table.copy_(bo.attn.relative_position_bias_table)
            if lo.downsample is not None:
                pairs.append((lh.downsample, lo.downsample))
        for dst, src in pairs:
            dst.load_state_dict(src.state_dict(), strict=True)
    assert not any(p.isnan().any() for p in hf.parameters()), "a SwinModel parameter was not written"
    return hf


def hf_maps(hf, x):
    out = hf(x, output_hidden_states=True, output_hidden_states_before_downsampling=True)
    return out, out.reshaped_hidden_states[1:]


def build(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = {**SWIN_T, **kw}
    m = SwinTransformer(**cfg)
    m.hf_config = dict(embed_dim=cfg["embed_dim"], depths=list(cfg["depths"]), num_heads=list(cfg["num_heads"]),
                       window_size=cfg["window_size"])
    return randomise(m, seed)


@pytest.fixture(scope="module")
def swin_t():
    return build(0)


@pytest.fixture(scope="module")
def x224():
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ours224(swin_t, x224):
    with torch.no_grad():
        maps = swin_t(x224)
        return maps, swin_t.norm(maps[-1].flatten(2).transpose(1, 2))  # = forward_features (checked below)


@pytest.fixture(scope="module")
def small_ref(swin_t):
    """A 64² input (cheap on Swin-T: windows shrink to the grid in stages 3-4) and its maps."""
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        return x, swin_t(x)


@pytest.fixture(scope="module")
def blank(swin_t):
    """One Swin-T target reused by the loader tests (poisoned with NaN before each load)."""
    return copy.deepcopy(swin_t)


@pytest.fixture(scope="module")
def hf_t(swin_t):
    transformers = pytest.importorskip("transformers", minversion="5.0")  # 5.x module names
    return to_hf(swin_t, transformers)


# ----------------------------------------------------------------------------- parity with transformers


def test_parity_swin_t_224(hf_t, x224, ours224):
    maps, feats = ours224
    with torch.no_grad():
        out, ref = hf_maps(hf_t, x224)
    assert [tuple(m.shape) for m in maps] == [(1, 96, 56, 56), (1, 192, 28, 28), (1, 384, 14, 14), (1, 768, 7, 7)]
    for i, (a, b) in enumerate(zip(maps, ref, strict=True)):
        torch.testing.assert_close(a, b, **TOL, msg=f"stage {i + 1}")
    torch.testing.assert_close(feats, out.last_hidden_state, **TOL)
    torch.testing.assert_close(feats.mean(1), out.pooler_output, **TOL)


@pytest.mark.parametrize("hw", [(256, 256), (320, 256)])
def test_parity_padded_sizes_values_and_grads(hw):
    """Grids that are not multiples of the window (64/32/16/8 at 256): HF pads each block. Built
    for 224, so the window/shift choice and the shift masks are re-derived at run time."""
    transformers = pytest.importorskip("transformers", minversion="5.0")  # 5.x module names
    ours = build(2, **SMALL, img_size=224)
    hf = to_hf(ours, transformers)  # fresh per resolution: SwinModel mutates its window sizes
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(3))
    maps = ours(x)
    _, ref = hf_maps(hf, x)
    for i, (a, b) in enumerate(zip(maps, ref, strict=True)):
        assert a.shape == (1, 16 * 2**i, hw[0] // 2 ** (i + 2), hw[1] // 2 ** (i + 2))
        torch.testing.assert_close(a, b, **TOL, msg=f"stage {i + 1}")
    w = [torch.randn(m.shape, generator=torch.Generator().manual_seed(i)) for i, m in enumerate(maps)]
    sum((m * wi).sum() for m, wi in zip(maps, w)).backward()
    sum((m * wi).sum() for m, wi in zip(ref, w)).backward()

    def close(g, ref):  # grads are sums over thousands of tokens (up to ~1e3): compare to their scale
        assert (g - ref).abs().max() <= 1e-5 * ref.abs().max(), (g - ref).abs().max()

    close(ours.patch_embed.proj.weight.grad, hf.embeddings.patch_embeddings.projection.weight.grad)
    for lo, lh in zip(ours.layers, hf.encoder.layers, strict=True):
        for bo, bh in zip(lo.blocks, lh.blocks, strict=True):
            a = bh.attention
            qkv = torch.cat([a.q_proj.weight.grad, a.k_proj.weight.grad, a.v_proj.weight.grad])
            close(bo.attn.qkv.weight.grad, qkv)
            close(bo.attn.relative_position_bias_table.grad,
                  a.relative_position_bias.relative_position_bias_table.grad)
            close(bo.norm1.weight.grad, bh.layernorm_before.weight.grad)


# ----------------------------------------------------------------------------- loader round trips


def assert_same(model, ref, x, ref_maps):
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with torch.no_grad():
        for a, b in zip(model(x), ref_maps, strict=True):
            assert torch.equal(a, b)


def test_load_transformers5(swin_t, hf_t, blank, small_ref):
    sd = hf_t.state_dict()
    assert len(sd) == 219
    target = poison(blank)
    rep = load_swin_weights(target, sd)
    assert (rep["scheme"], len(rep["loaded"]), rep["missing"], rep["unexpected"]) == ("transformers5", 171, [], [])
    assert_same(target, swin_t, *small_ref)


def test_load_timm(swin_t, blank, small_ref):
    sd = {}
    for k, v in swin_t.state_dict().items():
        p = k.split(".")
        if p[0] == "layers" and p[2] == "downsample":  # timm: merging at the start of the next stage
            k = ".".join(["layers", str(int(p[1]) + 1), *p[2:]])
        sd[k] = v
    sd["head.fc.weight"], sd["head.fc.bias"] = torch.randn(1000, 768), torch.randn(1000)
    assert len(sd) == 173
    target = poison(blank)
    rep = load_swin_weights(target, sd)
    assert (rep["scheme"], len(rep["loaded"]), rep["missing"], rep["unexpected"]) == ("timm", 171, [], [])
    assert sorted(rep["dropped"]) == ["head.fc.bias", "head.fc.weight"]
    assert_same(target, swin_t, *small_ref)


def official_state_dict(model: SwinTransformer, num_classes: int = 1000) -> dict:
    """Our weights plus what an official .pth also saves: derived buffers and the head."""
    sd = dict(model.state_dict())
    for name, m in model.named_modules():
        if isinstance(m, ShiftedWindowAttention):
            sd[f"{name}.relative_position_index"] = relative_position_index(m.window_size)
        if getattr(m, "attn_mask", None) is not None:
            sd[f"{name}.attn_mask"] = m.attn_mask.clone()
    sd["head.weight"] = torch.randn(num_classes, model.stage_channels[-1])
    sd["head.bias"] = torch.randn(num_classes)
    return sd


def test_load_official(swin_t, blank, small_ref):
    sd = official_state_dict(swin_t)
    assert len(sd) == 190
    assert sum(k.endswith("attn_mask") for k in sd) == 5
    masks = {tuple(v.shape) for k, v in sd.items() if k.endswith("attn_mask")}
    assert masks == {(64, 49, 49), (16, 49, 49), (4, 49, 49)}
    # official names load strict once derived buffers and head are gone
    derived = [k for k in sd if k.endswith(("relative_position_index", "attn_mask")) or k.startswith("head.")]
    assert len(derived) == 19
    res = poison(blank).load_state_dict({k: v for k, v in sd.items() if k not in derived}, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    target = poison(blank)
    rep = load_swin_weights(target, {"model": sd})
    assert (rep["scheme"], len(rep["loaded"]), rep["missing"], rep["unexpected"]) == ("official", 171, [], [])
    assert sorted(rep["dropped"]) == sorted(derived)
    assert_same(target, swin_t, *small_ref)


def test_load_official_file(tmp_path):
    ours = build(7, **SMALL, img_size=256)
    path = tmp_path / "swin_small_test.pth"
    torch.save({"model": official_state_dict(ours, 10)}, path)
    target = nan_copy(ours)
    rep = load_swin_weights(target, path)
    assert (rep["scheme"], rep["source"], rep["missing"], rep["unexpected"]) == ("official", str(path), [], [])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_same(target, ours, x, ours(x))


def test_load_transformers4_hub_folder(tmp_path):
    """transformers 5.x save_pretrained writes the legacy 4.x / Hub names (its conversion_mapping
    reversed): an independent source for that scheme, and the folder/safetensors path."""
    transformers = pytest.importorskip("transformers", minversion="5.0")  # 5.x module names
    ours = build(4, **SMALL, img_size=64)
    to_hf(ours, transformers).save_pretrained(tmp_path)
    target = nan_copy(ours)
    rep = load_swin_weights(target, tmp_path)
    assert (rep["scheme"], rep["missing"], rep["unexpected"]) == ("transformers4", [], [])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_same(target, ours, x, ours(x))


def test_load_prefix_partial_and_errors(tmp_path):
    ours = build(5, **SMALL, img_size=64)
    sd = {f"image_encoder.{k}": v for k, v in ours.state_dict().items()}
    del sd["image_encoder.norm.weight"]
    sd["decoder.conv.weight"] = torch.zeros(3)
    sd["image_encoder.extra.weight"] = torch.zeros(3)
    target = nan_copy(ours)
    rep = load_swin_weights(target, {"state_dict": sd}, verbose=False)
    assert rep["scheme"] == "official" and rep["missing"] == ["norm.weight"]
    assert rep["unexpected"] == ["image_encoder.extra.weight"] and rep["dropped"] == ["decoder.conv.weight"]
    assert target.norm.weight.isnan().all() and torch.equal(target.norm.bias, ours.norm.bias)

    junk = tmp_path / "not_swin.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, junk)
    with pytest.raises(ValueError, match="not_swin.pth: no Swin weights"):
        load_swin_weights(ours, junk)
    small = SwinTransformer(64, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=7)
    with pytest.raises(ValueError, match="do not fit this model"):
        load_swin_weights(small, ours.state_dict())


# ----------------------------------------------------------------------------- properties


def test_windows_are_batch_outermost_then_row_major():
    x = torch.randn(2, 6, 9, 5)
    w = to_window_heads(x, (3, 3), heads=1).view(-1, 3, 3, 5)  # (B*nW, ws, ws, C), as Swin's mask reads it
    assert w.shape == (2 * 6, 3, 3, 5)
    for b in range(2):  # batch outermost, then windows row-major
        for r in range(2):
            for c in range(3):
                assert torch.equal(w[b * 6 + r * 3 + c], x[b, 3 * r:3 * r + 3, 3 * c:3 * c + 3])


def test_shift_mask_values():
    H = W = 14
    ws, s = 7, 3
    mask = shift_attention_mask(H, W, ws, s)
    assert mask.shape == (4, 49, 49)

    def region(i, n):  # slow reference: slices [0:-ws], [-ws:-s], [-s:]
        return 0 if i < n - ws else (1 if i < n - s else 2)

    for wi in range(4):
        r0, c0 = ws * (wi // 2), ws * (wi % 2)
        ids = [region(r0 + t // ws, H) * 3 + region(c0 + t % ws, W) for t in range(ws * ws)]
        ref = torch.tensor([[0.0 if a == b else -100.0 for b in ids] for a in ids])
        assert torch.equal(mask[wi], ref)
    assert (mask[0] == 0).all() and (mask[3] == -100).any() and (mask[3] == 0).any()
    assert set(mask.unique().tolist()) == {0.0, -100.0}


def test_shift_sizes_and_windows(swin_t):
    shifts = [[b.shift_size for b in layer.blocks] for layer in swin_t.layers]
    assert shifts == [[0, 3], [0, 3], [0, 3, 0, 3, 0, 3], [0, 0]]
    assert [b.window_size for layer in swin_t.layers for b in layer.blocks] == [7] * 12
    last = swin_t.layers[3].blocks[1]
    assert last.window_and_shift(7, 7) == (7, 0) and last.window_and_shift(8, 8) == (7, 3)
    assert last.window_and_shift(4, 6) == (4, 0)
    assert all(b.attn_mask is None for layer in swin_t.layers for b in layer.blocks if b.shift_size == 0)
    keys = " ".join(swin_t.state_dict())  # derived buffers are not persistent
    assert "attn_mask" not in keys and "relative_position_index" not in keys


def test_relative_position_index_and_sub_window_bias():
    ws = 4
    idx = relative_position_index(ws)
    pos = [(t // ws, t % ws) for t in range(ws * ws)]
    ref = torch.tensor([[(a[0] - b[0] + ws - 1) * (2 * ws - 1) + a[1] - b[1] + ws - 1 for b in pos] for a in pos])
    assert torch.equal(idx, ref) and idx.min() == 0 and idx.max() == (2 * ws - 1) ** 2 - 1
    attn = ShiftedWindowAttention(8, 2, ws)
    table = attn.relative_position_bias_table
    for w in (ws, 2):  # a smaller window reads its offsets from the same table
        bias = attn.relative_position_bias(w)
        sub = [(t // w, t % w) for t in range(w * w)]
        for h in range(2):
            exp = torch.stack([torch.stack([table[(a[0] - b[0] + ws - 1) * (2 * ws - 1) + a[1] - b[1] + ws - 1, h]
                                            for b in sub]) for a in sub])
            assert torch.equal(bias[h], exp)


def test_patch_merging_order():
    x = torch.zeros(1, 2, 4, 2)
    for h in range(2):
        for w in range(4):
            x[0, h, w] = torch.tensor([10 * h + w, -(10 * h + w)])
    out = merge_2x2(x)
    assert out.shape == (1, 1, 2, 8)
    # official order x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2]: row offset fastest
    assert out[0, 0, 0].tolist() == [0, -0, 10, -10, 1, -1, 11, -11]
    assert out[0, 0, 1].tolist() == [2, -2, 12, -12, 3, -3, 13, -13]
    pm = PatchMerging(2)
    nn.init.normal_(pm.norm.weight), nn.init.normal_(pm.norm.bias)
    torch.testing.assert_close(pm(x), pm.reduction(pm.norm(out)))
    assert pm.reduction.bias is None and pm.reduction.weight.shape == (4, 8)


def test_drop_path_linear_rule_and_behaviour():
    m = SwinTransformer(64, **{**SMALL, "window_size": 4}, drop_path_rate=0.2)
    probs = [b.drop_path.drop_prob for layer in m.layers for b in layer.blocks]
    torch.testing.assert_close(torch.tensor(probs), torch.linspace(0, 0.2, 8))
    dp = DropPath(0.5).train()
    x = torch.ones(64, 3, 2)
    y = dp(x)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()  # whole sample dropped or scaled by 1/keep
    assert 0 < (per_sample[:, 0] == 0).sum() < 64
    assert torch.equal(dp.eval()(x), x)


def test_backward_every_parameter():
    torch.manual_seed(0)
    # 64² with window 4: shifted blocks in stages 1-2, window = grid in 3-4 (a 2x2 sub-window in 4)
    m = SwinTransformer(64, **{**SMALL, "window_size": 4}, drop_path_rate=0.1).train()
    x = torch.randn(2, 3, 64, 64)
    maps = m(x)
    sum(((f * torch.randn_like(f)).sum() for f in maps)).backward()
    assert m.norm.weight.grad is None  # the decoder maps do not go through the final norm
    (m.forward_features(x) * torch.randn(2, 4, 128)).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_forward_features(swin_t, small_ref):
    x, maps = small_ref
    with torch.no_grad():
        feats = swin_t.forward_features(x)
    assert feats.shape == (1, 4, 768)
    torch.testing.assert_close(feats, nn.functional.layer_norm(
        maps[-1].flatten(2).transpose(1, 2), (768,), swin_t.norm.weight, swin_t.norm.bias), rtol=0, atol=0)


def test_tiny_config_and_forward_stage():
    c = tiny_config()
    m = SwinTransformer(c.image_size, c.patch_size, c.in_chans, c.embed_dim, c.depths, c.num_heads,
                        c.window_size, c.mlp_ratio, True, c.drop_path_rate).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = m(x)
        assert [tuple(f.shape) for f in maps] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
        f = x
        for i in range(1, 5):  # stage by stage, as the model calls it between MCM blocks
            f = m.forward_stage(i, f)
            torch.testing.assert_close(f, maps[i - 1], rtol=0, atol=0)


def test_bad_sizes_raise():
    m = SwinTransformer(64, **{**SMALL, "window_size": 4})
    with pytest.raises(ValueError, match=r"100x100 is not a multiple of 32.*96 or 128"):
        m(torch.randn(1, 3, 100, 100))
    with pytest.raises(ValueError, match="1 channels, the encoder expects 3"):
        m(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="even grid, got 7x8"):
        m.forward_stage(2, torch.randn(1, 16, 7, 8))
    with pytest.raises(ValueError, match="16-channel"):
        m.forward_stage(2, torch.randn(1, 32, 8, 8))
    with pytest.raises(ValueError, match="outside 1..4"):
        m.forward_stage(5, torch.randn(1, 128, 2, 2))
    with pytest.raises(ValueError, match="img_size 200x200"):
        SwinTransformer(200)
    with pytest.raises(ValueError, match="do not split into 5 heads"):
        SwinTransformer(224, num_heads=(5, 6, 12, 24))
