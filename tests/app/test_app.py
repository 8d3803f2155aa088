"""app.py over HTTP: a server on a free local port with a tiny random checkpoint, called with
Gradio's own client; its mask PNG must be the bytes `eval.py --image ... --text ... --out` writes."""
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

gr = pytest.importorskip("gradio", reason="the page needs requirements-app.txt (Gradio)")
gradio_client = pytest.importorskip("gradio_client")

import app  # noqa: E402
import app_inputs  # noqa: E402
import eval as evaluate  # noqa: E402

CAPTION = "Unilateral pulmonary infection, one infected area, lower left lung."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A random tiny model (64², MCM at stages 2-4) moved off its initialisation, where MCM's output
    is zero and the caption could not matter, saved as train.py saves best.pt."""
    from tmc.checkpoint import save_checkpoint, text_config_of
    from tmc.config import tiny_config
    from tmc.model import build_model

    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(path, {"model": model.state_dict(), "model_config": cfg.to_dict(),
                           "text_config": text_config_of(model), "train_config": {"dataset": "demo"}})
    return path


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    """The page served on 127.0.0.1 in this process; closed after the module's tests."""
    port = _free_port()
    page = app.main(["--ckpt", str(tiny_ckpt), "--port", str(port), "--device", "cpu",
                     "--examples-dir", str(tmp_path_factory.mktemp("examples"))], block=False)
    client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False,
                                  download_files=str(tmp_path_factory.mktemp("downloads")))
    yield client
    client.close() if hasattr(client, "close") else None
    page.close()


def _image(tmp_path) -> Path:
    from PIL import Image

    from datasets.demo import render_demo_image

    image = render_demo_image(0, 7)[0]  # (64, 64) uint8, a demo picture the model's size
    Image.fromarray(image).save(tmp_path / "x.png")
    return tmp_path / "x.png"


def _call(client, image, caption, gt=None):
    handle = gradio_client.handle_file
    return client.predict(handle(str(image)), caption, handle(str(gt)) if gt else None,
                          api_name="/segment_image")


@pytest.mark.parametrize("caption", [CAPTION, ""])
def test_page_mask_is_eval_py_mask_byte_for_byte(server, tiny_ckpt, tmp_path, caption):
    image = _image(tmp_path)
    overlay, heatmaps, info, mask_png = _call(server, image, caption)
    argv = ["--ckpt", str(tiny_ckpt), "--image", str(image), "--out", str(tmp_path / "m.png"),
            "--device", "cpu"] + (["--text", caption] if caption else [])
    evaluate.main(argv)
    assert Path(mask_png).read_bytes() == (tmp_path / "m.png").read_bytes()
    assert len(heatmaps) == 3 and Path(overlay).is_file()  # MCM stages 2, 3 and 4 of the tiny preset
    assert ("none (the mask comes from the image alone)" in info) == (caption == "")


def test_captions_steer_the_mask_and_dice_is_reported(server, tmp_path):
    from PIL import Image

    from tmc.metrics import confusion, dice_from_counts

    image = _image(tmp_path)
    _, _, _, a = _call(server, image, CAPTION)
    _, _, _, b = _call(server, image, "Bilateral pulmonary infection, upper right lung.")
    assert Path(a).read_bytes() != Path(b).read_bytes()  # this model reads the caption
    gt = np.zeros((64, 64), np.uint8)
    gt[10:30, 5:40] = 255
    Image.fromarray(gt).save(tmp_path / "gt.png")
    _, _, info, mask_png = _call(server, image, CAPTION, tmp_path / "gt.png")
    pred = np.asarray(Image.open(mask_png)) > 0
    tp, fp, fn = confusion(pred[None], gt[None] > 0)
    assert f"{float(dice_from_counts(tp, fp, fn, 1.0)[0]):.4f}" in info


def test_bad_files_get_a_message_and_the_server_goes_on(server, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "scan.png").write_bytes(b"\x89PNG but cut short")
    overlay, _, info, mask_png = _call(server, tmp_path / "notes.txt", CAPTION)
    assert overlay is None and mask_png is None
    assert "notes.txt: not an image file" in info and "fix:" in info
    _, _, info, _ = _call(server, tmp_path / "scan.png", CAPTION)
    assert "scan.png: cannot read the image" in info and "fix:" in info
    (tmp_path / "ct.mha").write_bytes(b"ObjectType = Image")
    _, _, info, nifti = server.predict(gradio_client.handle_file(str(tmp_path / "ct.mha")), "",
                                    "auto", api_name="/segment_volume")  # state stays on the server
    assert "ct.mha: a volume of another kind" in info and "fix:" in info and nifti is None
    _, _, info, _ = server.predict(None, CAPTION, None, api_name="/segment_image")
    assert "no image yet; fix:" in info
    _, _, _, mask_png = _call(server, _image(tmp_path), "")  # still serving
    assert Path(mask_png).is_file()


def test_huge_image_and_a_checkpoint_that_does_not_load_are_named(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((300, 400), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(app_inputs.Problem, match=r"big.png: 400x300 pixels.*fix: downscale"):
        app_inputs.read_upload(tmp_path / "big.png", max_pixels=10_000)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    model = app_inputs.Model(tmp_path / "broken.pt", torch.device("cpu"))
    with pytest.raises(app_inputs.Problem, match=r"broken.pt: not a TMC checkpoint.*fix:"):
        app_inputs.segment_image(model, tmp_path / "big.png", "")


def test_no_checkpoint_anywhere_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"no runs/\*/best.pt here yet; fix: train one"):
        app.main([])


def test_volume_mask_is_eval_py_mask_in_the_input_grid(server, tiny_ckpt, tmp_path):
    nib = pytest.importorskip("nibabel")
    data = np.random.default_rng(0).integers(-1000, 400, (40, 30, 3)).astype(np.int16)
    affine = np.diag([-0.9, 0.8, 3.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "ct.nii.gz"))
    _, _, info, nifti = server.predict(gradio_client.handle_file(str(tmp_path / "ct.nii.gz")), CAPTION,
                                       "ct", api_name="/segment_volume")
    evaluate.main(["--ckpt", str(tiny_ckpt), "--volume", str(tmp_path / "ct.nii.gz"), "--text", CAPTION,
                   "--intensity", "ct", "--out", str(tmp_path / "m.nii.gz"), "--device", "cpu"])
    page, cli = nib.load(nifti), nib.load(str(tmp_path / "m.nii.gz"))
    assert page.shape == data.shape and "40x30x3 voxels" in info
    np.testing.assert_allclose(page.affine, affine)
    np.testing.assert_array_equal(np.asarray(page.dataobj), np.asarray(cli.dataobj))
