"""Mixed precision: which --amp mode runs on a device, the autocast context, the gradient scaler, and
the precision of the training step (tmc.step.TrainStep). AMP runs only on CUDA."""
from __future__ import annotations

from contextlib import nullcontext

import torch


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision. AMP runs only on CUDA."""
    if amp not in ("off", "bf16", "fp16"):
        raise ValueError(f"amp must be off, bf16 or fp16, not {amp!r}")
    if amp == "off" or device.type != "cuda":
        return None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def resolve_amp(amp: str, device: torch.device) -> tuple[str, str]:
    """(the AMP mode to run, a line saying why) for --amp auto|off|bf16|fp16 on `device`.

    auto: bf16 where the GPU supports it, else fp16 (with a GradScaler); off on the CPU, where
    bf16/fp16 are ignored rather than run silently in fp32 under their name.
    """
    if device.type != "cuda":
        if amp in ("bf16", "fp16"):
            return "off", f"amp: --amp {amp} is ignored on {device.type} (AMP runs on CUDA only): fp32"
        return "off", "amp: off (fp32)" + (" (auto: no CUDA device)" if amp == "auto" else "")
    if amp != "auto":
        return amp, f"amp: {amp}"
    if torch.cuda.is_bf16_supported():
        return "bf16", "amp: bf16 (auto: this GPU supports bf16; --amp off for fp32)"
    return "fp16", "amp: fp16 with a gradient scaler (auto: no bf16 on this GPU; --amp off for fp32)"


def autocast(device: torch.device, amp: str):
    dtype = amp_dtype(amp, device)
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype else nullcontext()


def make_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 on CUDA (bf16 needs none)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(amp, device) == torch.float16)


def step_precision(amp: str, device: torch.device, distributed: bool) -> str:
    """TrainStep's precision for --amp: bf16 working weights on one CUDA device, autocast under DDP or
    torch.compile (DDP reduces the gradients of the model's own parameters) and for fp16, fp32 on CPU."""
    dtype = amp_dtype(amp, device)
    if dtype is None:
        return "off"
    if dtype == torch.bfloat16:
        return "autocast-bf16" if distributed else "bf16"
    return "autocast-fp16"
