"""One training step as device work only: forward, loss, backward and the Adam update, with no read of
a tensor's value on the host. A GPU then never waits for the host between steps, and the whole step
can be recorded once in a CUDA graph and replayed (`CudaGraphStep`), which removes the host's cost of
issuing each kernel.

Precision (`TrainStep(precision=...)`):
  "off"            fp32;
  "autocast-bf16", "autocast-fp16"   torch.autocast around the forward (fp16 with a GradScaler);
  "bf16"           bf16 working weights (`Bf16Weights`): the model's fp32 parameters stay the masters
                   Adam updates, forward and backward read bf16 copies without autocast, so the cast
                   autocast issues for every weight in every step (and its gradient's cast back) goes.

The non-finite guard is decided on the device: the loss's finiteness becomes the fused Adam's
`found_inf`, which skips the update inside the kernel (as GradScaler does for fp16), instead of a
host `if` on the loss. Optimizers without that argument (not fused) fall back to the host check.

Batch: {"image" (B, 1|3, H, W), "mask" (B, 1, H, W), "input_ids", "attention_mask" (B, T) (absent for
the image-only model), "text_features" (B, T, d_l) when the text encoder is frozen, "positives" (B, B) bool from `caption_positive_mask`}.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.func import functional_call

PRECISIONS = ("off", "autocast-bf16", "autocast-fp16", "bf16")
# "text_features": a frozen encoder's cached output (TMC.tokenize), so the encoder does not run per step.
TOKEN_KEYS = ("input_ids", "attention_mask", "text_features")


class Bf16Weights:
    """bf16 working copies of a model's parameters and floating buffers, and their fp32 masters.

    BatchNorm keeps its fp32 parameters and running statistics (it updates them in place; its kernels
    take bf16 inputs with fp32 parameters), and so do 0-d parameters (the alignment's logit scale and
    bias, read by the fp32 losses: a bf16 copy would cost a cast each way and round the temperature).
    Call the model through `__call__`; after backward, `grads_to_masters()` copies the bf16 gradients
    into the masters' fp32 `.grad` in one op, and after the optimizer step `refresh()` copies the
    masters back in one op.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        kept = {id(t) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}
        kept |= {id(p) for p in model.parameters() if p.ndim == 0}  # scalars: no matmul reads them
        self.names = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in kept]
        params = dict(model.named_parameters())
        self.masters = [params[n] for n in self.names]
        self.work = [p.detach().to(dtype).requires_grad_() for p in self.masters]
        self.tensors = dict(zip(self.names, self.work))
        for n, b in model.named_buffers():
            if b is not None and b.is_floating_point() and id(b) not in kept:
                self.tensors[n] = b.to(dtype)  # constants (pixel mean, masks, position codes)
        self.grads = [torch.zeros_like(p) for p in self.masters]  # the masters' fp32 .grad, reused

    def __call__(self, model: nn.Module, *args, **kwargs):
        return functional_call(model, self.tensors, args, kwargs)

    def zero_grad(self) -> None:
        for w in self.work:
            w.grad = None

    def grads_to_masters(self) -> None:
        used = [i for i, w in enumerate(self.work) if w.grad is not None]  # unused parameters stay None
        for m, g, w in zip(self.masters, self.grads, self.work):
            m.grad = g if w.grad is not None else None
        if used:
            torch._foreach_copy_([self.grads[i] for i in used], [self.work[i].grad for i in used])

    @torch.no_grad()
    def refresh(self) -> None:
        torch._foreach_copy_(self.work, self.masters)


class TrainStep:
    """forward + loss + backward + optimizer step on device tensors; returns 0-d device tensors.

    Args:
        model: TMC (or a DDP wrapper of it; "bf16" needs the plain model).
        optimizer: Adam; fused (CPU or CUDA) for the device-side guard.
        loss_fn: (model output, batch) -> (loss, seg, align), 0-d tensors.
        precision: one of PRECISIONS (module docstring).
        scaler: GradScaler (active only for fp16).
        grad_clip: clip the gradient norm to this value (0 = off).
        world_size: > 1 under torchrun: the skip decision is all-reduced, so every rank skips together.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, *, precision: str = "off",
                 scaler: torch.amp.GradScaler | None = None, grad_clip: float = 0.0, world_size: int = 1):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.precision, self.grad_clip, self.world_size = precision, grad_clip, world_size
        self.scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
        self.weights = Bf16Weights(model) if precision == "bf16" else None
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        # Fused Adam/AdamW/SGD read `found_inf` on the device; others need the host to skip.
        self.device_guard = all(g.get("fused") for g in optimizer.param_groups)
        self.on_phase = None  # optional callback("backward" | "optimizer"), for lab.op_count

    def forward(self, batch: dict) -> dict:
        image = batch["image"]
        tokens = {k: batch[k] for k in TOKEN_KEYS if k in batch}
        if self.weights is not None:
            if "text_features" in tokens:  # fp32 from the cache; the working weights are bf16
                tokens["text_features"] = tokens["text_features"].to(torch.bfloat16)
            return self.weights(self.model, image.to(torch.bfloat16), **tokens)
        dtype = {"autocast-bf16": torch.bfloat16, "autocast-fp16": torch.float16}.get(self.precision)
        ctx = torch.autocast(image.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            return self.model(image, **tokens)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.weights is not None:
            self.weights.zero_grad()

    def __call__(self, batch: dict, skip: torch.Tensor | None = None) -> dict:
        """One step. `skip` (0-d float, 1 = skip) forces the update off, e.g. for warm-up steps.

        Returns {"loss", "seg", "align"} (detached) and "finite" (bool: the update was applied)."""
        loss, seg, align = self.loss_fn(self.forward(batch), batch)
        bad = (~torch.isfinite(loss)).float()  # 0-d, 1 = skip this update
        if skip is not None:
            bad = bad + skip
        if self.world_size > 1:
            torch_dist.all_reduce(bad)  # every rank must skip together, or DDP's all-reduce would hang
        self.zero_grad()
        result = {"loss": loss.detach(), "seg": seg.detach(), "align": align.detach(), "finite": bad == 0}
        if not self.device_guard and bool(bad):  # host fallback: a sync, only for non-fused optimizers
            return result
        if self.on_phase:
            self.on_phase("backward")
        self.scaler.scale(loss).backward()
        if self.on_phase:
            self.on_phase("optimizer")
        if self.weights is not None:
            self.weights.grads_to_masters()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        if self.scaler.is_enabled():  # fp16: the scaler's own found_inf covers a non-finite loss's grads
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.device_guard:
            self.optimizer.found_inf = (bad > 0).float()  # the fused kernel skips when it is 1
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        else:
            self.optimizer.step()
        if self.weights is not None:
            self.weights.refresh()
        return result


class CudaGraphStep:
    """A TrainStep recorded in a CUDA graph on its first call and replayed after: one launch per step
    instead of thousands.

    Every batch must have the first one's shapes (the loader drops the last partial batch). Inputs are
    copied into static buffers; the returned tensors are overwritten by the next call. Learning rates
    become device tensors, so a scheduler's change reaches the recorded Adam kernel. Warm-up runs with
    the update skipped (Adam's state is created, nothing learns) and the model's buffers (BatchNorm
    statistics) restored, so training starts from the same weights as eager.
    """

    def __init__(self, step: TrainStep, warmup: int = 3):
        device = next(step.model.parameters()).device
        if not torch.cuda.is_available() or device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device; fix: drop --cuda-graphs on this machine")
        if not step.device_guard:
            raise ValueError("CUDA graphs need a fused optimizer (the skip is decided on the device); "
                             "fix: torch.optim.Adam(..., fused=True)")
        self.step, self.warmup, self.device = step, warmup, device
        self.model = step.model
        self.graph = None

    def record(self, example: dict) -> None:
        step, device = self.step, self.device
        for group in step.optimizer.param_groups:
            if not torch.is_tensor(group["lr"]):
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
        self.static = {k: v.clone() for k, v in example.items()}
        self.skip = torch.ones((), device=device)
        buffers = [b for b in step.model.buffers() if b is not None]
        saved = [b.clone() for b in buffers]
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                step(self.static, skip=self.skip)
        torch.cuda.current_stream(device).wait_stream(stream)
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
        self.skip.zero_()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = step(self.static, skip=self.skip)

    def __call__(self, batch: dict) -> dict:
        if self.graph is None:
            self.record(batch)
        for k, v in batch.items():
            if v.shape != self.static[k].shape:
                raise ValueError(f"CUDA graphs need one batch shape: {k} is {tuple(v.shape)}, recorded "
                                 f"{tuple(self.static[k].shape)}; fix: drop the last partial batch")
            self.static[k].copy_(v, non_blocking=True)
        self.graph.replay()
        return self.out
