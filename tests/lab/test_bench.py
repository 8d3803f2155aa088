"""lab.flops: FLOP accounting against hand counts; lab.bench: the JSON a CPU run writes (fields, types,
sanity).

No timing is asserted, only that times are positive and the derived figures are consistent.
"""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lab import bench, flops
from tmc.config import tiny_config
from tmc.model import build_model


@pytest.fixture
def one_thread():
    """The shared 2-core CI machine runs much faster on one thread; restore the setting afterwards."""
    n = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(n)


class _Stage(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 16)])

    def forward_stage(self, i, x):  # called directly, like SwinTransformer.forward_stage
        return self.layers[i](x)


class TMC(nn.Module):
    """A stand-in with TMC's top-level names, so part attribution can be checked by hand."""

    def __init__(self):
        super().__init__()
        self.swin, self.text = _Stage(), nn.Linear(4, 8)
        self.text_proj = nn.ModuleDict({"2": nn.Linear(8, 16)})
        self.mcm = nn.ModuleDict({"2": nn.Linear(16, 16)})
        self.align = nn.ModuleDict({"2": nn.Linear(16, 2)})
        self.decoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x, t):
        h = self.swin.forward_stage(1, self.swin.forward_stage(0, x))  # (B, 16)
        lang = self.text_proj["2"](self.text(t))  # (B, 16)
        h = self.mcm["2"](h + lang)
        self.align["2"](h)
        return self.decoder(h) + (h @ h.T).sum()  # the B×B matmul is TMC's own: "other"


def test_part_flops_match_a_hand_count_including_modules_called_by_method():
    B = 3
    x, t = torch.randn(B, 8), torch.randn(B, 4)
    lin = lambda i, o: 2 * B * i * o  # noqa: E731  (2 FLOPs per multiply-add)
    total, parts = flops.count_flops(lambda: TMC()(x, t))
    assert parts == {
        "swin": lin(8, 8) + lin(8, 16),
        "text_encoder": lin(4, 8),
        "mcm": lin(16, 16) + lin(8, 16),
        "alignment": lin(16, 2),
        "decoder": lin(16, 32) + lin(32, 1),
        "other": 2 * B * 16 * B,
    }
    assert total == sum(parts.values())


def test_fused_attention_is_counted():
    B, nH, N, Dh = 2, 3, 49, 16
    q, k, v = (torch.randn(B, nH, N, Dh) for _ in range(3))
    total, _ = flops.count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert total == 2 * (2 * B * nH * N * N * Dh)  # q·kᵀ and weights·v


def test_matmul_peak_is_a_positive_measurement():
    peak = bench.matmul_peak(torch.device("cpu"), torch.float32, n=128, iters=3)
    assert math.isfinite(peak) and 1e6 < peak < 1e15


def test_fp16_on_cpu_is_refused_with_a_fix():
    with pytest.raises(ValueError, match="fix"):
        bench.bench(bench.parse_args(["--config", "tiny", "--device", "cpu", "--amp", "fp16"]))


def test_count_prints_parts_and_forward_flops(one_thread, capsys, tmp_path):
    out = tmp_path / "count.json"
    bench.main(["--config", "tiny", "--count", "--json", str(out), *one_thread])
    text = capsys.readouterr().out
    for part in ("text_encoder", "swin", "mcm", "alignment", "decoder", "total", "forward"):
        assert f"  {part}" in text
    r = json.loads(out.read_text())
    assert r["forward_gflops_2mac"] == pytest.approx(2 * r["forward_gmacs"])
    assert sum(r["forward_gflops_per_part"].values()) == pytest.approx(r["forward_gflops_2mac"])
    assert r["params"]["total"] == sum(p.numel() for p in build_model(tiny_config()).parameters())


def test_cpu_benchmark_writes_sane_json(one_thread, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--config", "tiny", "--device", "cpu", "--batch", "2", "--warmup", "1", "--steps", "2",
            "--infer-batch", "2", "--infer-iters", "1", "--peak-n", "256", "--json", str(out), *one_thread]
    bench.main(argv)
    r = json.loads(out.read_text())

    types = {"command": str, "device_name": str, "torch_version": str, "dtype": str, "text_model": str,
             "batch": int, "image_size": int, "text_length": int, "params_total": int, "compile": bool,
             "train_step_ms": float, "train_images_per_s": float, "peak_memory_gib": float,
             "peak_memory_kind": str, "train_gflops_per_step": float, "peak_tflops": float,
             "fraction_of_peak": float, "forward_gflops": float, "infer_images_per_s": float,
             "infer_latency_ms_b1": float}
    for key, kind in types.items():
        assert isinstance(r[key], kind), (key, r.get(key))
    cfg = tiny_config()
    assert r["device"] == "cpu" and r["torch_version"] == torch.__version__ and r["dtype"] == "float32"
    assert "--config tiny" in r["command"] and r["batch"] == 2
    assert (r["image_size"], r["text_length"]) == (cfg.image_size, cfg.text_length)
    assert r["params_total"] == sum(p.numel() for p in build_model(cfg).parameters())
    assert sum(v for k, v in r["params"].items() if k != "total") == r["params_total"]

    # Times and throughputs are positive and consistent with each other.
    assert r["train_step_ms"] > 0 and r["infer_latency_ms_b1"] > 0 and r["infer_images_per_s"] > 0
    assert r["train_images_per_s"] == pytest.approx(2 / (r["train_step_ms"] / 1e3))
    assert r["achieved_tflops"] == pytest.approx(r["train_gflops_per_step"] / r["train_step_ms"])
    assert 0 < r["fraction_of_peak"] <= 1 and r["peak_tflops"] > 0 and "256^3" in r["peak_matmul"]
    assert r["peak_memory_gib"] >= 0 and "ru_maxrss" in r["peak_memory_kind"]
    assert math.isfinite(r["loss"])

    # FLOPs: forward per part adds up; forward+backward is about 3× the forward of the batch.
    parts = r["forward_gflops_per_part"]
    assert sum(parts.values()) == pytest.approx(r["forward_gflops"])
    assert all(parts[p] > 0 for p in ("swin", "text_encoder", "mcm", "decoder"))
    assert 2.5 < r["train_over_forward"] < 3.5


def test_suite_runs_the_gpu_table_and_writes_one_json_per_row(tmp_path, monkeypatch):
    seen = []

    def fake_bench(args):
        seen.append(args)
        if args.cuda_graphs and args.steps > 0:
            raise RuntimeError("compile broke")
        return {"params_total": 1, "forward_gflops": 1.0, "batch": args.batch, "infer_latency_ms_b1": 20.0}

    monkeypatch.setattr(bench, "bench", fake_bench)
    bench.suite(str(tmp_path))
    assert {p.name for p in tmp_path.iterdir()} == {f"{name}.json" for name in bench.SUITE_ROWS} >= {
        "train_b8_eager.json", "train_b8_compile.json", "train_b32_eager.json", "train_b32_compile.json",
        "infer_eager.json"}
    assert all(a.config == "paper" and a.amp == "bf16" and a.channels_last and a.text_model is None for a in seen)
    train = {(a.batch, a.compile, a.cuda_graphs) for a in seen if a.steps > 0 and a.infer_iters == 0}
    assert train == {(8, False, False), (8, True, False), (32, False, False), (32, True, False), (8, True, True)}
    infer = {a.compile: a for a in seen if a.steps == 0}
    assert infer[False].infer_batch == 64 and infer[False].infer_iters > 0 and infer[True].cuda_graphs
    assert json.loads((tmp_path / "infer_eager.json").read_text())["targets_met"] == {"infer_latency_ms_b1": False}
    # the failing row recorded its error, and the row after it still ran
    failed = json.loads((tmp_path / "train_b8_cudagraphs.json").read_text())
    assert failed["error"] == "RuntimeError: compile broke" and "--cuda-graphs" in failed["command"]
    assert list(bench.SUITE_ROWS).index("infer_cudagraphs") > list(bench.SUITE_ROWS).index("train_b8_cudagraphs")

    seen.clear()
    bench.main(["--suite", str(tmp_path / "some"), "--rows", "infer_eager,train_b32_eager"])
    assert sorted(p.name for p in (tmp_path / "some").iterdir()) == ["infer_eager.json", "train_b32_eager.json"]
    assert [a.batch for a in seen] == [1, 32]  # in the order asked
    with pytest.raises(ValueError, match="unknown suite rows.*train_b8_eager"):
        bench.suite(str(tmp_path), rows=["train_b9"])


def test_targets_follow_the_speed_and_memory_thresholds():
    row = {"train_step_ms": 1.0, "batch": 8, "fraction_of_peak": 0.11, "peak_memory_gib": 12.5}
    assert bench.targets_met(row) == {"fraction_of_peak": True, "peak_memory_gib": False}
    row.update(batch=32, peak_memory_gib=20.0)
    assert bench.targets_met(row) == {"fraction_of_peak": False, "peak_memory_gib": True}
    assert bench.targets_met({"batch": 1, "infer_latency_ms_b1": 9.5}) == {"infer_latency_ms_b1": True}
    assert bench.targets_met({"batch": 16, "train_step_ms": 1.0, "fraction_of_peak": 0.5}) == {}


def test_op_counter_counts_kernels_not_views_and_flags_syncs():
    from lab.op_count import OpCounter

    x = torch.randn(4, 4)
    with OpCounter() as counter:
        y = x.view(16).view(4, 4).transpose(0, 1)  # views: no kernel
        z = (y + 1).sum()  # two kernels
        z.item()  # a host read: a sync on a GPU
    assert sum(counter.ops.values()) == 3  # add, sum, _local_scalar_dense
    assert counter.syncs == {("forward", "_local_scalar_dense"): 1}


def test_op_count_of_a_tiny_training_step_by_part(tmp_path):
    from lab.op_count import main

    main(["--config", "tiny", "--json", str(tmp_path / "tiny.json")])
    r = json.loads((tmp_path / "tiny.json").read_text())
    assert r["command"] == f"python -m lab.op_count --config tiny --json {tmp_path / 'tiny.json'}"
    assert sum(r["per_part"].values()) == sum(r["ops"].values()) == r["total"] > 1000
    # 1,524 before BERT's fused q/k/v, the stage-drawn stochastic depth, the written-out CPU attention
    # and the BatchNorm without its step counter, 1,354 after them; 1,271 after windows and heads in
    # one copy, the padding mask prepared once and the fp32 scalars: a change that adds ops shows here
    assert r["total"] <= 1300
    assert {"swin", "text_encoder", "mcm", "decoder", "alignment", "backward", "optimizer"} <= r["per_part"].keys()
    assert r["per_part"]["optimizer"] < 10  # fused Adam: a few kernels for all parameters
    assert r["ops"]["_to_copy"] > 0  # the casts (the losses read fp32 logits) are counted
    assert r["syncs"] == {}
