"""tmc.layers: the shared blocks keep their values while issuing fewer ops; old checkpoint keys load."""
import torch

from tmc.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from tmc.config import tiny_config
from tmc.layers import (Dropout, DropPath, PositionCode, from_window_heads, sincos_position_embedding,
                        to_window_heads)
from tmc.model import build_model
from lab.op_count import OpCounter


def test_native_dropout_draws_what_nn_dropout_draws_in_one_op():
    x = torch.randn(32, 50)
    torch.manual_seed(3)
    reference = torch.nn.functional.dropout(x, 0.25, training=True)
    torch.manual_seed(3)
    with OpCounter() as counter:
        ours = Dropout(0.25).train()(x)
    torch.testing.assert_close(ours, reference)
    assert sum(counter.ops.values()) == 1
    assert torch.equal(Dropout(0.25).eval()(x), x)


def test_drop_path_add_is_residual_plus_drop_path_in_fewer_ops():
    x, r = torch.randn(8, 3, 5), torch.randn(8, 3, 5)
    dp = DropPath(0.5).train()
    torch.manual_seed(0)
    with OpCounter() as plain:
        reference = r + dp(x)
    torch.manual_seed(0)
    with OpCounter() as fused:
        ours = dp.add(r, x)
    torch.testing.assert_close(ours, reference)
    assert sum(fused.ops.values()) < sum(plain.ops.values())
    assert torch.equal(dp.eval().add(r, x), r + x)


def test_position_code_is_built_once_per_grid():
    pc = PositionCode(16, (3, 4))
    torch.testing.assert_close(pc(3, 4), sincos_position_embedding(3, 4, 16))
    with OpCounter() as counter:
        first = pc(3, 4)
    assert sum(counter.ops.values()) == 0 and pc(3, 4) is first  # no rebuild
    torch.testing.assert_close(pc(2, 2), sincos_position_embedding(2, 2, 16))  # another size: rebuilt
    assert pc(2, 2).dtype == torch.float32 and pc(2, 2, torch.bfloat16).dtype == torch.bfloat16


def test_a_checkpoint_with_the_old_decoder_mlp_keys_loads(tmp_path):
    """The decoder's ViT MLP was nn.Sequential (mlp.0, mlp.2) before tmc.layers.Mlp (mlp.fc1, mlp.fc2),
    and its BatchNorm layers counted their steps."""
    cfg = tiny_config()
    model = build_model(cfg)
    old = {k.replace(".mlp.fc1.", ".mlp.0.").replace(".mlp.fc2.", ".mlp.2.") if k.startswith("decoder.") else k: v
           for k, v in model.state_dict().items()}
    assert any(".mlp.0." in k for k in old)
    # ... and its BatchNorm layers kept a step counter
    old |= {k.replace(".running_mean", ".num_batches_tracked"): torch.tensor(7) for k in old if
            k.endswith(".running_mean")}
    save_checkpoint(tmp_path / "old.pt", {"model": old, "model_config": cfg.to_dict(), "text_config": None})
    renamed = load_checkpoint(tmp_path / "old.pt")["model"]
    assert [k for k in renamed if not k.endswith(".num_batches_tracked")] == list(model.state_dict())
    loaded, _ = model_from_checkpoint(tmp_path / "old.pt")
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_branch_scales_are_zero_or_inverse_keep_and_unbiased():
    from tmc.layers import branch_scales

    torch.manual_seed(0)
    keep = torch.tensor([1.0, 0.9, 0.5])
    scales = branch_scales(keep, 20000)  # (3, B)
    assert scales.shape == (3, 20000)
    assert torch.equal(scales[0], torch.ones(20000))  # keep 1: never dropped
    for row, kp in zip(scales[1:], keep[1:]):
        assert set(row.unique().tolist()) == {0.0, (1.0 / kp).item()}
        assert abs(row.mean().item() - 1.0) < 0.03  # the expected branch is unchanged
    x, r = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    dp = DropPath(0.5).train()
    s = branch_scales(torch.tensor([0.5]), 4).view(4, 1, 1)
    torch.testing.assert_close(dp.add(r, x, s), r + x * s)


def test_window_heads_match_a_token_by_token_partition_and_invert():
    B, H, W, wh, ww, nH, Dh = 2, 6, 8, 3, 4, 2, 5
    x = torch.randn(B, H, W, 3 * nH * Dh)
    out = to_window_heads(x, (wh, ww), nH, parts=3)
    assert out.shape == (3, B, (H // wh) * (W // ww), nH, wh * ww, Dh) and out.is_contiguous()
    for b in range(B):  # slow reference: window n row-major over the grid, token t row-major inside it
        for n in range((H // wh) * (W // ww)):
            for t in range(wh * ww):
                r, c = (n // (W // ww)) * wh + t // ww, (n % (W // ww)) * ww + t % ww
                token = x[b, r, c].view(3, nH, Dh)  # [q | k | v], each heads x Dh
                assert torch.equal(out[:, b, n, :, t], token)
    for part in range(3):
        back = from_window_heads(out[part], (H, W), (wh, ww))
        assert torch.equal(back, x[..., part * nH * Dh:(part + 1) * nH * Dh])


def test_window_heads_copy_once_each_way():
    x = torch.randn(2, 14, 14, 3 * 4 * 8)
    with OpCounter() as counter:
        out = to_window_heads(x, (7, 7), 4, parts=3)
        from_window_heads(out[0], (14, 14), (7, 7))
    assert sum(counter.ops.values()) == 2
