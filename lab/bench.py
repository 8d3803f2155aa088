"""Size and speed of a TMC configuration.

    python -m lab.bench --config paper --count          # parameters and forward FLOPs per part at 224²
    python -m lab.bench --config tiny --batch 2 --steps 3 --infer-batch 4 --threads 1 --json out.json
    python -m lab.bench --config paper --batch 32 --amp bf16 --compile --json b32.json   # one GPU row
    python -m lab.bench --config paper --batch 8 --profile    # top kernels + forward time per part
    python -m lab.bench --suite bench_out/                    # the whole GPU table, one JSON per row
    python -m lab.bench --suite bench_out/ --rows train_b8_eager,infer_eager          # some of its rows
    python -m lab.bench --config paper --batch 8 --amp bf16 --graph-step    # the step in one CUDA graph

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode: 2 FLOPs per multiply-add of matmuls,
convolutions and attention; element-wise work (norms, GELU, softmax, the optimizer) is not counted.
thop/fvcore-style "FLOPs" are multiply-adds (MACs), half of our number; we print both. Attention is
counted through the math SDPA backend because FlopCounterMode has no formula for the fused CPU kernel
(it would count 0). Training FLOPs per step are counted directly over forward + backward of the real
loss (about 3× the forward), not assumed.

A training step is forward + loss (segmentation_loss + 0.1·multistage_alignment_loss) + backward + fused
Adam step, run by tmc.step.TrainStep as train.py runs it (--amp bf16: bf16 working weights; --graph-step:
the whole step replayed from one CUDA graph, as train.py --cuda-graphs).
Times are medians over --steps steps after --warmup steps, taken with torch.cuda.Event on GPU and
time.perf_counter on CPU. The fraction of peak divides counted training FLOP/s by the best throughput of
an n³ matmul measured in the same run (bf16 8192³ on GPU; 1024³ in the compute dtype, fp32 by default,
on CPU). Peak memory is torch.cuda.max_memory_allocated on GPU; on CPU the growth of the process's
resident-set high-water mark (ru_maxrss) during training, a lower bound.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile as torch_profile

from lab.flops import count_flops, forward_flops
from lab.workload import DTYPES, autocast, make_batch, make_model, make_train_step, step_inputs
from tmc.config import PRESETS
from tmc.model import count_parameters
from tmc.step import CudaGraphStep

PAPER_PARAMS = 242.8e6
PAPER_GFLOPS = 145.7


# ---------------------------------------------------------------------------- helpers

def time_calls(fn, warmup: int, iters: int, device: torch.device) -> list[float]:
    """Seconds of each of `iters` calls of fn() (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, iters: int = 10) -> float:
    """Best FLOP/s of an n×n×n matmul (2n³ FLOPs) in `dtype`: this device's reference peak."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / min(time_calls(lambda: a @ b, warmup=2, iters=iters, device=device))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        cpu = f"{names[0]} ×{len(names)} cores" if names else cpu
    return f"{cpu}, {torch.get_num_threads()} torch threads"


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------- one benchmark row

def setup(args) -> SimpleNamespace:
    """What one row needs: device, amp, cfg, `model` (eager: FLOPs are counted on it), `run` (the model
    or its torch.compile wrapper: times are taken on it) and `step(eager=False)`, one training step."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = args.amp or ("bf16" if device.type == "cuda" else "off")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA (GradScaler); fix: use --amp bf16 or --amp off on CPU")
    if args.cuda_graphs and not (args.compile and device.type == "cuda"):
        raise ValueError("--cuda-graphs means torch.compile(mode='reduce-overhead'); fix: add --compile, on CUDA")
    if args.graph_step and (args.compile or device.type != "cuda"):
        raise ValueError("--graph-step records tmc.step's eager step in a CUDA graph; fix: without --compile, on CUDA")
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions
    cfg, model = make_model(args.config, args.text_model, args.image_size)
    model.to(device).train()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    run = torch.compile(model, mode="reduce-overhead" if args.cuda_graphs else None) if args.compile else model
    # Fused Adam (one kernel for all parameters), as train.py uses it.
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4, fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    batch = step_inputs(make_batch(model, cfg.image_size, args.batch, device, args.channels_last))
    timed = make_train_step(run, optimizer, scaler, amp, cfg.alignment_form, compiled=args.compile)
    eager = make_train_step(model, optimizer, scaler, amp, cfg.alignment_form, args.compile) if args.compile else timed
    if args.graph_step:
        timed = CudaGraphStep(timed)

    def new_step() -> None:  # CUDA graphs: a new iteration begins, earlier graph outputs may be reused
        if args.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def step(eager_step: bool = False) -> torch.Tensor:  # eager_step: uncompiled, for counting FLOPs
        new_step()
        return (eager if eager_step else timed)(batch)["loss"]

    return SimpleNamespace(device=device, amp=amp, cfg=cfg, model=model, run=run, step=step, new_step=new_step)


def measure_training(s: SimpleNamespace, args) -> dict:
    """Step time, images/s, peak memory, counted FLOPs per step and their fraction of the matmul peak."""
    cuda, losses, rss0 = s.device.type == "cuda", [], maxrss_bytes()  # CPU: the first step sets the mark
    for _ in range(args.warmup):
        s.step()
    if cuda:  # after warm-up: compiling and cuDNN autotuning use scratch memory a trainer would not hold
        torch.cuda.synchronize(s.device)
        torch.cuda.reset_peak_memory_stats(s.device)
    times = time_calls(lambda: losses.append(s.step()), 0, args.steps, s.device)
    if cuda:
        memory, kind = torch.cuda.max_memory_allocated(s.device), "torch.cuda.max_memory_allocated"
    else:
        memory, kind = maxrss_bytes() - rss0, "ru_maxrss growth during training (lower bound)"
    step = statistics.median(times)
    # Counted after timing, so the CPU high-water mark above is the timed step's own.
    flops, _ = count_flops(lambda: s.step(eager_step=True))
    peak_dtype, peak_n = (torch.bfloat16, 8192) if cuda else (DTYPES[s.amp], 1024)
    peak_n = args.peak_n or peak_n
    peak = matmul_peak(s.device, peak_dtype, peak_n)
    return {"train_step_ms": step * 1e3, "train_step_ms_min": min(times) * 1e3, "warmup": args.warmup,
            "steps": args.steps, "train_images_per_s": args.batch / step, "loss": losses[-1].item(),
            "peak_memory_gib": memory / 2**30, "peak_memory_kind": kind, "train_gflops_per_step": flops / 1e9,
            "train_flops_method": "FlopCounterMode over forward+backward (2 FLOPs per MAC)",
            "achieved_tflops": flops / step / 1e12, "peak_tflops": peak / 1e12,
            "peak_matmul": f"{peak_n}^3 {str(peak_dtype).removeprefix('torch.')}",
            "fraction_of_peak": flops / step / peak}


def measure_inference(s: SimpleNamespace, args) -> dict:
    """Images/s at --infer-batch and latency at batch 1, eval mode, no autograd."""
    result = {"infer_batch": args.infer_batch}
    s.run.eval()
    for key, b in (("infer_images_per_s", args.infer_batch), ("infer_latency_ms_b1", 1)):
        image, _, tokens, _ = make_batch(s.model, s.cfg.image_size, b, s.device, args.channels_last)
        with torch.inference_mode(), autocast(s.device, s.amp):
            call = lambda: (s.new_step(), s.run(image, **tokens))  # noqa: E731
            t = statistics.median(time_calls(call, args.warmup, args.infer_iters, s.device))
        result[key] = b / t if key == "infer_images_per_s" else t * 1e3
    s.run.train()
    return result


def bench(args) -> dict:
    """Measure one row of the table (see the module docstring); returns the JSON-ready dict."""
    s = setup(args)
    params = count_parameters(s.model)
    result = {"command": " ".join(["python -m lab.bench", *args.argv]), "preset": args.config,
              "device": s.device.type, "device_name": device_name(s.device), "torch_version": torch.__version__,
              "amp": s.amp, "dtype": str(DTYPES[s.amp]).removeprefix("torch."), "compile": args.compile,
              "channels_last": args.channels_last, "cuda_graphs": args.cuda_graphs,
              "graph_step": args.graph_step, "batch": args.batch,
              "image_size": s.cfg.image_size, "text_model": s.cfg.text_model, "text_length": s.cfg.text_length,
              "params": params, "params_total": params["total"]}
    if args.steps > 0:
        result.update(measure_training(s, args))
    forward, parts = forward_flops(s.model, s.cfg.image_size, per_part=True)
    result.update(forward_gflops=forward / 1e9, forward_gmacs=forward / 2e9,
                  forward_gflops_per_part={k: v / 1e9 for k, v in parts.items()})
    if args.steps > 0:
        result["train_over_forward"] = result["train_gflops_per_step"] / (args.batch * result["forward_gflops"])
    if args.infer_iters > 0:
        result.update(measure_inference(s, args))
    return result


# ---------------------------------------------------------------------------- profile, suite, CLI

def label_parts(model) -> list:
    """Wrap the forward of each part (Swin stage, text encoder, MCM block, decoder block) in a profiler
    range "part:<name>"; returns the hook handles. Backward runs in autograd's engine, unlabelled."""
    def enter(name):
        def hook(module, inputs):
            module._bench_range = torch.profiler.record_function(f"part:{name}")
            module._bench_range.__enter__()
        return hook

    def leave(module, inputs, output):
        module._bench_range.__exit__(None, None, None)

    modules, handles = dict(model.named_modules()), []
    for name, m in modules.items():
        depth, parent = name.count("."), name.rpartition(".")[0]
        # Parts and their children; the entries of a ModuleList/ModuleDict (swin.layers.0, decoder.up.3)
        # count as children of the part, since the container itself is never called.
        listed = depth == 2 and isinstance(modules[parent], (torch.nn.ModuleList, torch.nn.ModuleDict))
        if name and (depth <= 1 or listed):
            handles += [m.register_forward_pre_hook(enter(name)), m.register_forward_hook(leave)]
    return handles


def profile(args, steps: int = 3, rows: int = 20) -> str:
    """Top ops by self device (CUDA, else CPU) time over a few training steps, then forward time per part."""
    s = setup(args)
    for _ in range(max(args.warmup, 1)):
        s.step()
    cuda = s.device.type == "cuda"
    handles = label_parts(s.model)
    with torch_profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        for _ in range(steps):
            s.step()
        if cuda:
            torch.cuda.synchronize(s.device)
    for h in handles:
        h.remove()
    events = prof.key_averages()
    total = (lambda e: e.device_time_total) if cuda else (lambda e: e.cpu_time_total)
    lines = [events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=rows),
             f"forward time per part, {'device' if cuda else 'CPU'} ms per step (nested parts overlap):"]
    for e in sorted((e for e in events if e.key.startswith("part:")), key=total, reverse=True)[:rows]:
        lines.append(f"  {e.key[5:]:<28} {total(e) / 1e3 / steps:9.2f}")
    return "\n".join(lines)


def targets_met(r: dict) -> dict[str, bool]:
    """Speed and memory targets for one H100 in bf16: ≥10% / ≥25% of peak and ≤12 / ≤24 GiB when training at
    batch 8 / 32, ≤10 ms inference latency at batch 1. (Reference, an off-the-shelf assembly: 80 img/s
    = 0.5% of peak at batch 8, 397 img/s = 2.3% at batch 32.)"""
    met = {}
    if "train_step_ms" in r and r["batch"] in (8, 32):
        fraction, gib = {8: (0.10, 12), 32: (0.25, 24)}[r["batch"]]
        met.update(fraction_of_peak=r["fraction_of_peak"] >= fraction, peak_memory_gib=r["peak_memory_gib"] <= gib)
    if "infer_latency_ms_b1" in r:
        met["infer_latency_ms_b1"] = r["infer_latency_ms_b1"] <= 10
    return met


# The GPU benchmark table (paper config, 224², bf16, channels_last): name → extra flags, eager rows first,
# the slow compiling ones after. "cudagraphs" = torch.compile(mode="reduce-overhead"), for the small,
# launch-bound batches.
SUITE_ROWS = {
    "train_b8_eager": ["--batch", "8", "--warmup", "5", "--steps", "20", "--infer-iters", "0"],
    "train_b32_eager": ["--batch", "32", "--warmup", "5", "--steps", "20", "--infer-iters", "0"],
    "infer_eager": ["--batch", "1", "--steps", "0", "--infer-batch", "64", "--warmup", "5", "--infer-iters", "30"],
    "train_b32_compile": ["--batch", "32", "--warmup", "10", "--steps", "20", "--infer-iters", "0", "--compile"],
    "train_b8_compile": ["--batch", "8", "--warmup", "10", "--steps", "20", "--infer-iters", "0", "--compile"],
    "train_b8_graphstep": ["--batch", "8", "--warmup", "5", "--steps", "20", "--infer-iters", "0", "--graph-step"],
    "train_b32_graphstep": ["--batch", "32", "--warmup", "5", "--steps", "20", "--infer-iters", "0", "--graph-step"],
    "train_b8_cudagraphs": ["--batch", "8", "--warmup", "10", "--steps", "20", "--infer-iters", "0", "--compile",
                            "--cuda-graphs"],
    "infer_cudagraphs": ["--batch", "1", "--steps", "0", "--infer-batch", "64", "--warmup", "5",
                         "--infer-iters", "30", "--compile", "--cuda-graphs"],
}


def suite(out_dir: str, text_model: str | None = None, rows: list[str] | None = None) -> list[dict]:
    """Rows of SUITE_ROWS (all by default) in one process, one JSON per row in out_dir. A row that fails
    (a compile error, say) writes its error instead and the next row still runs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(rows or ()) - set(SUITE_ROWS))
    if unknown:
        raise ValueError(f"unknown suite rows {unknown}; fix: choose from {', '.join(SUITE_ROWS)}")
    keys = ("train_step_ms", "train_images_per_s", "fraction_of_peak", "peak_memory_gib", "infer_images_per_s",
            "infer_latency_ms_b1")
    results = []
    for name in rows or SUITE_ROWS:
        argv = ["--config", "paper", "--amp", "bf16", "--channels-last", *SUITE_ROWS[name]]
        argv += ["--text-model", text_model] if text_model else []
        t0 = time.time()
        try:
            result = bench(parse_args(argv))
            result["targets_met"] = targets_met(result)
            print(name, {k: round(result[k], 4) for k in keys if k in result}, result["targets_met"], flush=True)
        except Exception as e:  # noqa: BLE001 - one broken row must not cost the others
            result = {"command": " ".join(["python -m lab.bench", *argv]), "error": f"{type(e).__name__}: {e}"}
            print(name, "FAILED:", result["error"], flush=True)
        result["row_wall_s"] = time.time() - t0
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))
        results.append(result)
        torch.compiler.reset()  # the next row compiles afresh, not as a dynamic-shape variant of this one
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="paper", choices=sorted(PRESETS), help="model preset")
    p.add_argument("--image-size", type=int, default=None, help="input side (default: the preset's)")
    p.add_argument("--text-model", default=None, help="default for paper: random:12x768 (BERT-base shape)")
    p.add_argument("--count", action="store_true", help="only parameters and forward FLOPs")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--batch", type=int, default=8, help="training batch size")
    p.add_argument("--amp", default=None, choices=list(DTYPES), help="autocast (default: bf16 GPU, off CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--channels-last", action="store_true", help="model and input in channels_last")
    p.add_argument("--cuda-graphs", action="store_true", help="with --compile: mode='reduce-overhead'")
    p.add_argument("--graph-step", action="store_true",
                   help="record tmc.step's whole eager step in one CUDA graph (train.py --cuda-graphs)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (and inference calls) before timing")
    p.add_argument("--steps", type=int, default=10, help="timed training steps (0: no training)")
    p.add_argument("--infer-batch", type=int, default=64, help="batch of the inference images/s")
    p.add_argument("--infer-iters", type=int, default=10, help="timed inference calls (0: no inference)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (1 is faster on a busy shared CPU)")
    p.add_argument("--peak-n", type=int, default=None, help="matmul size of the peak (8192 GPU, 1024 CPU)")
    p.add_argument("--profile", action="store_true", help="profile a few training steps, print the top ops")
    p.add_argument("--suite", default=None, metavar="DIR", help="run the GPU table, one JSON per row in DIR")
    p.add_argument("--rows", default=None, help="with --suite: comma-separated rows (default: all of SUITE_ROWS)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def count(args) -> dict:
    """--count: parameters per part and forward FLOPs of one image (total and per part), printed."""
    cfg, model = make_model(args.config, args.text_model, args.image_size)
    fwd, parts = forward_flops(model, cfg.image_size, per_part=True)
    params, fwd = count_parameters(model), fwd / 1e9
    print(f"TMC preset {args.config!r} at {cfg.image_size}², text encoder {cfg.text_model}")
    for part, n in params.items():
        print(f"  {part:<13} {n / 1e6:9.2f} M")
    print(f"  forward       {fwd:9.2f} GFLOPs (2·MAC)  = {fwd / 2:.2f} GMACs")
    for part, g in parts.items():
        print(f"    {part:<11} {g / 1e9:9.2f} GFLOPs ({100 * g / 1e9 / fwd:.1f}%)")
    if args.config == "paper":
        ratio = (f"params {params['total'] / PAPER_PARAMS:.3f}, 2·MAC {fwd / PAPER_GFLOPS:.3f}, "
                 f"MAC {fwd / 2 / PAPER_GFLOPS:.3f}")
        print(f"  paper         {PAPER_PARAMS / 1e6:9.2f} M, {PAPER_GFLOPS} GFLOPs (ours/paper: {ratio})")
    return {"preset": args.config, "image_size": cfg.image_size, "text_model": cfg.text_model, "params": params,
            "forward_gflops_2mac": fwd, "forward_gmacs": fwd / 2,
            "forward_gflops_per_part": {k: v / 1e9 for k, v in parts.items()}}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.suite:
        suite(args.suite, args.text_model, args.rows.split(",") if args.rows else None)
    elif args.profile:
        print(profile(args))
    else:
        result = count(args) if args.count else bench(args)
        if not args.count:
            print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
