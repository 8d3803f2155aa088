"""tmc.step: the training step as device work only (bf16 working weights, device-side non-finite guard,
CUDA-graph recording) and the shared layers it relies on."""
import copy

import pytest
import torch

from lab.workload import make_batch, make_train_step, paper_loss, step_inputs
from tmc.config import tiny_config
from tmc.model import build_model
from lab.op_count import OpCounter
from tmc.step import CudaGraphStep, TrainStep


def _tiny(batch=2, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_config()
    model = build_model(cfg).train()
    data = make_batch(model, cfg.image_size, batch, torch.device("cpu"))
    return cfg, model, data


def _no_dropout(model):
    """Dropout draws differ between runs of different ops; compare the deterministic function."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_step_loss_equals_the_autocast_loss_of_before(amp):
    """The loss of a fixed batch through TrainStep (bf16: working weights, no autocast) equals the
    loss computed the old way (workload.paper_loss: fp32 model under autocast) within bf16 noise; fp32
    equals it to float rounding. Gradients agree in direction too."""
    cfg, model, data = _tiny()
    _no_dropout(model)
    reference = paper_loss(model, data, amp, cfg.alignment_form)
    reference.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    optimizer = torch.optim.Adam(model.parameters(), lr=0.0, fused=True)  # lr 0: weights stay put
    step = make_train_step(model, optimizer, None, amp, cfg.alignment_form)
    out = step(step_inputs(data))
    tol = dict(rtol=2e-2, atol=2e-3) if amp == "bf16" else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], reference.detach(), **tol)
    assert bool(out["finite"])
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    assert all(g.dtype == torch.float32 for g in grads.values())  # the masters' gradients are fp32
    flat = torch.cat([grads[n].flatten() for n in ref_grads])
    ref = torch.cat([g.flatten() for g in ref_grads.values()])
    cos = torch.nn.functional.cosine_similarity(flat, ref, dim=0)
    assert cos > (0.99 if amp == "bf16" else 0.999999)


@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_step_never_reads_the_device_on_the_host(amp):
    """No .item(), nonzero or bool(tensor) in forward, loss, backward, guard and Adam: each would stall
    a GPU's queue and break CUDA-graph capture."""
    cfg, model, data = _tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    step = make_train_step(model, optimizer, None, amp, cfg.alignment_form)
    batch = step_inputs(data)
    step(batch)
    with OpCounter() as counter:
        out = step(batch)
    assert counter.syncs == {}
    assert {k: tuple(v.shape) for k, v in out.items()} == {"loss": (), "seg": (), "align": (), "finite": ()}


def test_bf16_step_has_no_weight_casts_and_fewer_ops_than_autocast():
    """Autocast casts every weight in every step (and its gradient back); the working weights do not."""
    cfg, model, data = _tiny()
    counts = {}
    for precision in ("autocast-bf16", "bf16"):
        m = copy.deepcopy(model)
        optimizer = torch.optim.Adam(m.parameters(), lr=1e-3, fused=True)
        loss_fn = make_train_step(m, optimizer, None, "off", cfg.alignment_form).loss_fn
        step = TrainStep(m, optimizer, loss_fn, precision=precision)
        step(step_inputs(data))
        with OpCounter() as counter:
            step(step_inputs(data))
        counts[precision] = counter.ops
    casts = {p: sum(n for (_, _, op), n in c.items() if op == "_to_copy") for p, c in counts.items()}
    n_weights = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in model.modules())
    assert casts["autocast-bf16"] - casts["bf16"] > 2 * n_weights  # each weight: a cast and its gradient's
    assert sum(counts["bf16"].values()) < 0.8 * sum(counts["autocast-bf16"].values())


def _host_guard_step(model, optimizer, batch, loss_fn):
    """The step as train.py ran it before: the loss read on the host, the update skipped in Python."""
    loss, _, _ = loss_fn(model(batch["image"], input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]), batch)
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return loss.detach()
    loss.backward()
    optimizer.step()
    return loss.detach()


def test_device_guard_gives_the_host_guards_losses_and_still_skips_a_nonfinite_step():
    cfg, model, data = _tiny()
    _no_dropout(model)
    good = step_inputs(data)
    bad = dict(good, image=torch.full_like(good["image"], float("nan")))
    old, new = model, copy.deepcopy(model)
    old_opt = torch.optim.Adam(old.parameters(), lr=1e-3, fused=True)
    new_opt = torch.optim.Adam(new.parameters(), lr=1e-3, fused=True)
    step = make_train_step(new, new_opt, None, "off", cfg.alignment_form)
    assert step.device_guard

    old_losses, new_losses = [], []
    for batch in (good, bad, good, good):
        old_losses.append(_host_guard_step(old, old_opt, batch, step.loss_fn))
        out = step(batch)
        new_losses.append(out["loss"])
        assert bool(out["finite"]) == (batch is good)
    # BatchNorm saw the NaN batch in both (forward runs before the guard): compare the learned weights
    for a, b in zip(old_losses, new_losses):
        torch.testing.assert_close(a, b, equal_nan=True)
    for (name, p), q in zip(old.named_parameters(), new.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    steps = {int(s["step"]) for s in new_opt.state.values()}
    assert steps == {3}  # the skipped step did not count as an Adam step


def test_a_skipped_step_leaves_weights_and_adam_state_untouched():
    cfg, model, data = _tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    step = make_train_step(model, optimizer, None, "bf16", cfg.alignment_form)
    batch = step_inputs(data)
    step(batch)
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict()["state"]))
    work_before = [w.detach().clone() for w in step.weights.work]
    out = step(dict(batch, image=torch.full_like(batch["image"], float("inf"))))
    assert not bool(out["finite"])
    params = dict(model.named_parameters())
    for name, value in before[0].items():
        if name in params:
            assert torch.equal(params[name].detach(), value), name
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(value, before[1][i][key]), (i, key)
    assert all(torch.equal(w, b) for w, b in zip(step.weights.work, work_before))
    out = step(batch)  # and training goes on
    assert bool(out["finite"]) and not torch.equal(dict(model.named_parameters())["decoder.head.weight"],
                                                   before[0]["decoder.head.weight"])


def test_cuda_graph_step_refuses_a_cpu_model_with_a_fix():
    cfg, model, _ = _tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    step = make_train_step(model, optimizer, None, "off", cfg.alignment_form)
    with pytest.raises(RuntimeError, match="CUDA device; fix: drop --cuda-graphs"):
        CudaGraphStep(step)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_the_eager_losses():
    """Replayed from one recorded graph, the step gives eager's losses at equal steps (same weights;
    no dropout, so the draws do not matter)."""
    cfg, model, data = _tiny()
    _no_dropout(model)
    model.cuda()
    eager_model = copy.deepcopy(model)
    batch = {k: v.cuda() for k, v in step_inputs(data).items()}
    losses = []
    for m, graphs in ((eager_model, False), (model, True)):
        opt = torch.optim.Adam(m.parameters(), lr=torch.tensor(1e-3, device="cuda"), fused=True)
        step = make_train_step(m, opt, None, "bf16", cfg.alignment_form)
        step = CudaGraphStep(step) if graphs else step
        losses.append(torch.stack([step(batch)["loss"].clone() for _ in range(4)]))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_a_frozen_text_encoder_runs_once_per_caption_not_per_step(amp):
    """With freeze_text, TMC.tokenize returns the cached "text_features" and TrainStep passes them on:
    the encoder runs once per distinct caption (when first tokenized), never inside a step, and the
    step's loss equals the loss with the encoder run in the forward."""
    torch.manual_seed(0)
    cfg = tiny_config(freeze_text=True)
    model = _no_dropout(build_model(cfg).train())
    calls = []
    model.text.register_forward_hook(lambda *args: calls.append(1))
    image, mask, tokens, positives = make_batch(model, cfg.image_size, 4, torch.device("cpu"))
    distinct = len({tuple(r.tolist()) for r in tokens["input_ids"]})
    assert "text_features" in tokens and len(calls) == distinct  # each caption encoded alone, once
    uncached = {k: v for k, v in tokens.items() if k != "text_features"}
    reference = paper_loss(model, (image, mask, uncached, positives), amp, cfg.alignment_form).detach()
    calls.clear()
    params = [p for p in model.parameters() if p.requires_grad]
    step = make_train_step(model, torch.optim.Adam(params, lr=0.0, fused=True), None, amp, cfg.alignment_form)
    out = step(step_inputs((image, mask, tokens, positives)))
    step(step_inputs((image, mask, tokens, positives)))
    assert calls == []
    tol = dict(rtol=2e-2, atol=2e-3) if amp == "bf16" else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], reference, **tol)


def test_bf16_working_weights_leave_the_scalars_fp32():
    """The alignment's logit scale and bias are read by the fp32 losses: kept fp32, they cost no cast
    and their temperature is not rounded to bf16."""
    cfg, model, data = _tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    step = make_train_step(model, optimizer, None, "bf16", cfg.alignment_form)
    scalars = {n for n, p in model.named_parameters() if p.ndim == 0}
    assert scalars and not scalars & set(step.weights.tensors)
    out = step.forward(step_inputs(data))
    assert all(s["logit_scale"].dtype == s["logit_bias"].dtype == torch.float32 for s in out["alignment"])
    assert all(s["img"].dtype == torch.bfloat16 for s in out["alignment"])
