"""eval.py: metric wiring on hand-computed cases, run combination and the paired t-test, pictures,
single-image and volume prediction, and the demo trained and evaluated end to end (subprocesses)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eval as evaluate
from tmc.engine import predict_records, summarize
from tmc.metrics import METRIC_KEYS
from tmc.predict import make_segmenter
from tmc.visualize import GT_COLOR, PRED_COLOR, attention_heatmap, outline, overlay_contours

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- metric wiring

class MaskAsLogits(torch.nn.Module):
    """A stand-in segmenter whose prediction is its input image (0/1): logits ±10."""

    def forward(self, image, return_attention=False, **tokens):
        return {"logits": image * 20.0 - 10.0, "alignment": []}


def _square(y0, x0, h, w, size=8):
    m = torch.zeros(size, size)
    m[y0:y0 + h, x0:x0 + w] = 1
    return m


# (case, slice, prediction, ground truth); counts written out by hand below.
CASES = [
    ("c1", 0, _square(0, 0, 2, 5), _square(0, 0, 2, 5)),  # perfect: tp 10
    ("c1", 1, torch.zeros(8, 8), torch.zeros(8, 8)),  # empty vs empty
    ("c2", 0, _square(0, 0, 1, 5), _square(4, 0, 1, 5)),  # disjoint: fp 5, fn 5
    ("c2", 1, _square(0, 0, 2, 4), _square(0, 0, 2, 5) + _square(2, 0, 1, 5)),  # tp 8, fp 0, fn 7
    ("c3", 0, torch.zeros(8, 8), torch.zeros(8, 8)),  # a normal case, correctly empty
]


def _records(cases=CASES, batch_size=2):
    batches = []
    for k in range(0, len(cases), batch_size):
        chunk = cases[k:k + batch_size]
        batches.append({
            "image": torch.stack([p for _, _, p, _ in chunk])[:, None],  # (B, 1, 8, 8)
            "mask": torch.stack([g for _, _, _, g in chunk])[:, None],
            "text": ["caption"] * len(chunk), "case": [c for c, _, _, _ in chunk],
            "slice": torch.tensor([s for _, s, _, _ in chunk]),
            "key": [f"{c}#{s}" for c, s, _, _ in chunk],
        })
    return predict_records(MaskAsLogits(), batches, device=torch.device("cpu"),
                           tokenize=lambda captions: {}, progress=False)


def test_counts_and_protocols_match_hand_computation():
    recs = {r["key"]: r for r in _records()}
    assert (recs["c1#0"]["tp"], recs["c1#0"]["fp"], recs["c1#0"]["fn"]) == (10, 0, 0)
    assert (recs["c1#1"]["tp"], recs["c1#1"]["fp"], recs["c1#1"]["fn"]) == (0, 0, 0)
    assert (recs["c2#0"]["tp"], recs["c2#0"]["fp"], recs["c2#0"]["fn"]) == (0, 5, 5)
    assert (recs["c2#1"]["tp"], recs["c2#1"]["fp"], recs["c2#1"]["fn"]) == (8, 0, 7)

    s = summarize(list(recs.values()), empty=1.0)  # the paper-consistent rule
    d4, i4 = 16 / 23, 8 / 15  # slice c2#1: 2·8/(2·8+0+7), 8/(8+0+7)
    assert s["protocol"] == "per-case" and s["n_images"] == 5 and s["n_cases"] == 3
    assert s["dice_per_image"] == pytest.approx((1 + 1 + 0 + d4 + 1) / 5)
    assert s["iou_per_image"] == pytest.approx((1 + 1 + 0 + i4 + 1) / 5)
    assert s["dice_global"] == pytest.approx(2 * 18 / (2 * 18 + 5 + 12))
    assert s["iou_global"] == pytest.approx(18 / (18 + 5 + 12))
    assert s["cases"]["c2"]["dice"] == pytest.approx(d4 / 2)
    assert s["dice_per_case"] == pytest.approx((1 + d4 / 2 + 1) / 3)
    assert s["dice"] == s["dice_per_case"] and s["miou"] == s["iou_per_case"]
    assert s["n_images_empty"] == 2

    n = summarize(list(recs.values()), empty=math.nan)  # nnU-Net: empty-vs-empty left out
    assert n["dice_per_image"] == pytest.approx((1 + 0 + d4) / 3)
    assert n["dice_per_case"] == pytest.approx((1 + d4 / 2) / 2)  # c3 has no scorable slice
    assert n["n_cases_unscored"] == 1
    assert n["dice_global"] == pytest.approx(s["dice_global"])


def test_2d_sets_report_the_per_image_mean():
    recs = [{**r, "slice": -1} for r in _records()]
    s = summarize(recs)
    assert s["protocol"] == "per-image" and s["dice"] == s["dice_per_image"]


def test_runs_combine_to_mean_std_and_paired_t_test_matches_formula():
    def run(dice_by_case, name):
        return {"checkpoint": name, "cases": {c: {"dice": d, "iou": d / 2, "n_slices": 1}
                                              for c, d in dice_by_case.items()},
                **{k: dice_by_case["a"] for k in METRIC_KEYS},
                "protocol": "per-case", "empty_rule": "1", "n_images": 4, "n_cases": 4,
                "dataset": "demo", "split": "test"}

    a = evaluate.combine_runs([run({"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6}, "a1"),
                               run({"a": 0.7, "b": 0.8, "c": 0.9, "d": 0.8}, "a2")])
    b = evaluate.combine_runs([run({"a": 0.5, "b": 0.7, "c": 0.7, "d": 0.65}, "b1")])
    assert a["dice"] == pytest.approx(0.8) and a["dice_std"] == pytest.approx(np.std([0.9, 0.7], ddof=1))
    assert a["cases"]["a"]["dice"] == pytest.approx(0.8)  # averaged over the set's runs first
    res = evaluate.paired_test(a, b)
    diff = np.array([0.8 - 0.5, 0.8 - 0.7, 0.8 - 0.7, 0.7 - 0.65])
    t = diff.mean() / (diff.std(ddof=1) / math.sqrt(4))
    assert res["n_cases"] == 4
    assert res["t"] == pytest.approx(t) and res["mean_diff"] == pytest.approx(diff.mean())
    from scipy.stats import t as student_t
    assert res["p"] == pytest.approx(2 * student_t.sf(abs(t), df=3))


# ---------------------------------------------------------------------------- pictures

def test_attention_heatmap_excludes_padding_and_matches_slow_version():
    torch.manual_seed(0)
    B, L, H, W = 2, 5, 16, 16
    attn = {2: torch.softmax(torch.randn(B, 16, L), -1), 3: torch.softmax(torch.randn(B, 4, L), -1)}
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    heat = attention_heatmap(attn, keep, (H, W))
    assert heat.shape == (B, H, W) and heat.min() >= 0 and heat.max() <= 1

    def slow(b):
        stages = []
        for a in attn.values():
            a = a[b]  # (N, L)
            side = int(math.isqrt(a.shape[0]))
            cols = [a[:, l] / a[:, l].sum() for l in range(L) if keep[b, l]]
            m = torch.stack(cols).mean(0).view(1, 1, side, side)
            m = (m - m.min()) / (m.max() - m.min())
            stages.append(torch.nn.functional.interpolate(m, size=(H, W), mode="bilinear",
                                                          align_corners=False)[0, 0])
        m = torch.stack(stages).mean(0)
        return (m - m.min()) / (m.max() - m.min())

    for b in range(B):
        torch.testing.assert_close(heat[b], slow(b))
    # padding tokens carry no say: changing their weights leaves sample 0's map unchanged
    attn2 = {k: v.clone() for k, v in attn.items()}
    for v in attn2.values():
        v[0, :, 3:] = torch.rand_like(v[0, :, 3:])
    torch.testing.assert_close(attention_heatmap(attn2, keep, (H, W))[0], heat[0])


def test_overlay_draws_gt_and_prediction_contours_in_their_colours():
    image = np.full((10, 10), 0.5, dtype=np.float32)
    gt = np.zeros((10, 10), bool)
    gt[1:5, 1:5] = True
    pred = np.zeros((10, 10), bool)
    pred[6:9, 6:9] = True
    pred[1:5, 1:5] = True  # coincides with the ground truth there: both contours stay visible
    rgb = np.asarray(overlay_contours(image, gt, pred))
    inner, outer = outline(gt), outline(gt, outer=True)
    assert inner.sum() == 12 and not inner[2:4, 2:4].any()  # 4×4 square: 12 boundary pixels
    assert outer.sum() == 16 and not (outer & gt).any() and outer[0, 1:5].all()  # 4-neighbour ring
    assert (rgb[outer] == GT_COLOR).all() and (rgb[outline(pred)] == PRED_COLOR).all()
    assert (rgb[2, 2] == 128).all()  # inside stays the image


# ---------------------------------------------------------------------------- prediction files

def test_volume_prediction_keeps_the_input_grid_and_voxel_order(tmp_path):
    """A NIfTI stored in a non-canonical order (axial axis first, flipped axes) gets a mask with
    the same shape and affine, voxel for voxel where the input is bright."""
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    data = np.zeros((5, 12, 12), dtype=np.int16)  # stored as (Z, X', Y') with flips
    for z in range(5):  # 4×3 blocks: a transposed or flipped slice would not match
        y0, x0 = rng.integers(0, 8, 2)
        data[z, y0:y0 + 4, x0:x0 + 3] = 1000
    affine = np.array([[0, 0, -0.8, 40], [0, 0.7, 0, -20], [2.5, 0, 0, 5], [0, 0, 0, 1]], float)
    affine[:3, :3] = affine[:3, :3] @ np.diag([1, -1, 1])
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))

    def threshold(images):  # a "model" that segments bright pixels
        return images > 0.5

    out = evaluate.predict_volume(path, threshold, size=12, out=tmp_path / "m.nii.gz",
                                  intensity="minmax", batch_size=2)
    written = nib.load(str(out))
    assert written.shape == data.shape
    np.testing.assert_allclose(written.affine, affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj), (data > 500).astype(np.uint8))



def test_dicom_series_prediction_is_on_the_series_ras_grid(tmp_path):
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("pydicom")
    from datasets.dicom_series import read_dicom_series
    from tests.data.test_volumes import write_dicom_series

    stored = np.zeros((12, 12, 4), dtype=np.uint16)  # (Co, R, S)
    for s in range(4):
        stored[s:s + 5, 2 * s:2 * s + 3, s] = 900  # a 5×3 block moving with the slice
    write_dicom_series(tmp_path / "series", stored, iop=(1, 0, 0, 0, 1, 0), ipp0=(-10, 20, 5),
                       spacing=(0.7, 0.8), step=2.5)
    out = evaluate.predict_volume(tmp_path / "series", lambda im: im > 0.5, size=12,
                                  out=tmp_path / "m.nii.gz", intensity="minmax")
    array, affine = read_dicom_series(tmp_path / "series")
    written = nib.load(str(out))
    np.testing.assert_allclose(written.affine, affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj), (array > 450).astype(np.uint8))
    assert np.asarray(written.dataobj).sum() == 4 * 15

# ---------------------------------------------------------------------------- end to end (subprocesses)

def _run(args, cwd):
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`python train.py --dataset demo` shrunk: 30 images, 2 epochs of 2 steps."""
    tmp = tmp_path_factory.mktemp("e2e")
    out = tmp / "run"
    stdout = _run([str(REPO / "train.py"), "--dataset", "demo", "--root", str(tmp / "demo"),
                   "--cache-dir", str(tmp / "cache"), "--reader-options", "n=30", "--out", str(out),
                   "--epochs", "2", "--max-steps-per-epoch", "2", "--batch-size", "4",
                   "--no-progress", "--time-limit", "0"], cwd=tmp)
    return tmp, out, stdout


def test_demo_trains_and_evaluates_end_to_end(demo_run):
    tmp, out, stdout = demo_run
    assert "test Dice" in stdout and f"checkpoint: {out / 'best.pt'}" in stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["dataset"] == "demo" and config["model"]["image_size"] == 64

    stdout = _run([str(REPO / "eval.py"), "--ckpt", str(out / "best.pt"), str(out / "last.pt"),
                   "--json", str(tmp / "res.json"), "--save-overlays", str(tmp / "figs"),
                   "--max-overlays", "3", "--no-progress", "--workers", "0"], cwd=tmp)
    res = json.loads((tmp / "res.json").read_text())
    for key in ("dice", "miou", "dice_global", "iou_global", "n_images", "n_cases", "dataset",
                "split", "checkpoint", "dice_std"):
        assert key in res, key
    assert res["dataset"] == "demo" and res["split"] == "test" and res["n_runs"] == 2
    assert res["n_images"] == 6 and "empty-vs-empty = 1" in stdout
    test_json = json.loads((out / "test_metrics.json").read_text())  # train.py's own test pass
    assert test_json["dice"] > 0.05  # a model that segments something: the match is informative
    assert res["runs"][0]["dice"] == pytest.approx(test_json["dice"])
    rows = (tmp / "res_cases.csv").read_text().splitlines()
    assert rows[0].startswith("case,n_slices,A_dice,A_iou") and len(rows) == 1 + res["n_cases"]
    for run in ("run",):
        pictures = sorted((tmp / "figs" / run).glob("*.png"))
        assert len(pictures) == 4 and pictures[-1].name == "mosaic.png"  # 3 panels + the mosaic



def test_compare_two_sets_writes_the_paired_test(demo_run):
    tmp, out, _ = demo_run
    evaluate.main(["--compare", str(out / "best.pt"), "--", str(out / "last.pt"), "--json",
                   str(tmp / "cmp.json"), "--no-progress", "--workers", "0"])
    cmp = json.loads((tmp / "cmp.json").read_text())
    assert cmp["A"]["checkpoint"] == str(out / "best.pt")
    assert cmp["B"]["checkpoint"] == str(out / "last.pt")
    assert cmp["compare"]["n_cases"] == 6 and "ttest_rel" in cmp["compare"]["test"]
    header = (tmp / "cmp_cases.csv").read_text().splitlines()[0]
    assert header == "case,n_slices,A_dice,A_iou,A_dice_run1,B_dice,B_iou,B_dice_run1"


def test_single_image_prediction_is_written_at_the_input_size(demo_run, tmp_path):
    from PIL import Image

    _, out, _ = demo_run
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 83), dtype=np.uint8)).save(tmp_path / "x.png")
    evaluate.main(["--ckpt", str(out / "best.pt"), "--image", str(tmp_path / "x.png"),
                   "--text", "Unilateral pulmonary infection, one infected area, lower left lung.",
                   "--out", str(tmp_path / "mask.png")])
    mask = Image.open(tmp_path / "mask.png")
    assert mask.size == (83, 50) and set(np.unique(np.asarray(mask))) <= {0, 255}


def test_volume_prediction_with_the_model(demo_run, tmp_path):
    nib = pytest.importorskip("nibabel")
    _, out, _ = demo_run
    data = np.random.default_rng(0).integers(-1000, 400, (40, 30, 3)).astype(np.int16)
    affine = np.diag([-0.9, 0.8, 3.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "ct.nii.gz"))
    evaluate.main(["--ckpt", str(out / "best.pt"), "--volume", str(tmp_path / "ct.nii.gz"),
                   "--text", "Bilateral pulmonary infection, two infected areas.",
                   "--intensity", "ct", "--out", str(tmp_path / "mask.nii.gz")])
    written = nib.load(str(tmp_path / "mask.nii.gz"))
    assert written.shape == data.shape
    np.testing.assert_allclose(written.affine, affine)


def test_another_folder_is_scored_on_its_own_split_with_n_of_m(demo_run, tmp_path, capsys):
    """QaTa's LViT layout holding only Test_Folder, and the SGSeg layout, scored by a checkpoint
    trained elsewhere: every image of the asked split, never a 7:1:2 re-split of the folder."""
    import shutil
    import warnings

    from tests.data.test_qata import NAMES, make_lvit, make_sgseg

    _, out, _ = demo_run
    lvit = make_lvit(tmp_path / "lvit")
    shutil.rmtree(lvit / "Train_Folder"), shutil.rmtree(lvit / "Val_Folder")  # a test-only copy
    sgseg = make_sgseg(tmp_path / "sgseg")  # train 6 + valid 2, no test
    common = ["--ckpt", str(out / "best.pt"), "--dataset", "qata", "--no-progress", "--workers", "0"]

    def score(root, *extra):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = evaluate.main([*common, "--root", str(root), "--cache-dir",
                                 str(tmp_path / f"c-{root.name}-{'-'.join(extra)}"), *extra])
        captured = capsys.readouterr()
        assert "caching qata" not in captured.err  # --no-progress reaches the cache build's bar
        return res, captured.out

    res, text = score(lvit)
    assert (res["n_images"], res["n_folder"], res["split_mode"]) == (2, 2, "layout")
    assert "qata test (layout split) | 2 of 2 images of the folder" in text
    if not torch.cuda.is_available():  # --amp auto, as train.py resolves it: fp32 on a CPU
        assert "amp: off (fp32) (auto: no CUDA device)" in text
    res, text = score(sgseg, "--split", "all")
    assert (res["n_images"], res["n_folder"]) == (len(NAMES), len(NAMES))
    assert f"{len(NAMES)} of {len(NAMES)} images of the folder" in text
    assert score(sgseg, "--split", "val")[0]["n_images"] == 2
    with pytest.raises(SystemExit, match=r"no test images .*train 6, val 2, test 0.*--split all"):
        score(sgseg)
    res, _ = score(sgseg, "--split-mode", "paper", "--split", "all")  # re-split: still every image
    assert res["n_images"] == len(NAMES)


def test_the_runs_own_folder_keeps_the_runs_split(demo_run):
    _, out, _ = demo_run
    ckpt = torch.load(out / "best.pt", weights_only=True)
    args = evaluate.build_parser().parse_args(["--ckpt", "x"])
    own = evaluate.dataset_settings(ckpt, args)
    assert own["own"] and not own["partial"] and own["cache_dir"] == ckpt["train_config"]["cache_dir"]
    args = evaluate.build_parser().parse_args(["--ckpt", "x", "--root", "/elsewhere"])
    other = evaluate.dataset_settings(ckpt, args)
    assert not other["own"] and other["partial"] and other["split_mode"] == "layout"
    assert other["cache_dir"] == ""  # never the run's cache folder


@pytest.mark.parametrize("flags, message", [
    (["--image", "{d}/x.png", "--volume", "{d}/v.nii.gz"], "--image and --volume together"),
    (["--volume", "{d}/missing.nii.gz"], "missing.nii.gz: NIfTI file not found"),
    (["--volume", "{d}/one.dcm"], "one.dcm: a single DICOM file; expected a NIfTI file or a DICOM series"),
    (["--volume", "{d}/nothing"], "no such NIfTI file or DICOM series folder"),
    (["--image", "{d}/x.png", "--out", "m.nii.gz"], "--out m.nii.gz: the mask of --image is written as PNG"),
    (["--volume", "{d}", "--out", "m.png"], "--out m.png: the mask of --volume is written as NIfTI"),
    (["--batch-size", "0"], "--batch-size 0: expected at least 1"),
    (["--dataset", "qata", "--reader-options", "layot=lvit"], "qata has no setting layot; valid: layout"),
])
def test_bad_eval_flags_are_named_before_the_checkpoint_is_read(tmp_path, flags, message):
    (tmp_path / "x.png").write_bytes(b"png")
    (tmp_path / "one.dcm").write_bytes(b"dcm")
    argv = ["--ckpt", str(tmp_path / "never_read.pt")] + [f.format(d=tmp_path) for f in flags]
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        evaluate.main(argv)


def test_blank_text_is_no_caption():
    """A blank --text, or none, segments as the caption "" ([CLS] [SEP]) the model is trained on."""
    from tmc.config import tiny_config
    from tmc.model import build_model

    torch.manual_seed(0)
    model = build_model(tiny_config(image_size=32)).eval()
    images = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        for p in model.parameters():  # away from the initialisation, where MCM's output is zero
            p.add_(torch.randn_like(p) * 0.1)
        logits = model(images, **model.tokenize(["", ""]))["logits"]
        other = model(images, **model.tokenize(["upper left lung", "upper left lung"]))["logits"]
    assert not torch.allclose(logits, other)  # the caption matters to this model
    for blank in ("   \t", "", None):
        assert torch.equal(make_segmenter(model, blank, torch.device("cpu"))(images), logits > 0)
