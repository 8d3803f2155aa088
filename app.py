"""A local web page: drop an image or a volume, type a caption (or none), see the mask it steers.

    python app.py --ckpt runs/demo-tiny-s0-20261206-120000/best.pt   # serves http://127.0.0.1:7860
    python app.py                                # the newest runs/*/best.pt (train.py's default --out)
    python app.py --host 0.0.0.0 --port 8080     # reachable from other machines: say so on purpose

Needs `pip install -r requirements-app.txt` (Gradio). The page runs eval.py's code (app_inputs.py →
datasets/predict_files.py, tmc/predict.py): its mask PNG equals `eval.py --image ... --text ... --out`
byte for byte. Gradio's analytics are off and the page uses the system's fonts, so nothing leaves the
machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from PIL import Image

from datasets.demo import render_demo_image
from datasets.splits import assign_splits
from tmc.distributed import pick_device

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before Gradio is imported

from app_inputs import MAX_PIXELS, Model, Problem, newest_checkpoint, segment_image, \
    segment_volume_file, volume_slice  # noqa: E402

EXAMPLES = 3  # demo test images offered as examples


def fail(message: str):
    raise SystemExit(f"app.py: {message}")


def demo_examples(folder: Path, n: int = EXAMPLES) -> list[list[str]]:
    """[image, caption, ground truth] of the first `n` test images of the demo set (seed 0), rendered
    into `folder` exactly as `python train.py --dataset demo` writes them."""
    names = [f"demo_{i:04d}" for i in range(600)]
    split = assign_splits(names, seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in [k for k, name in enumerate(names) if split[name] == "test"][:n]:
        image, mask, caption, _ = render_demo_image(0, i)
        Image.fromarray(image).save(folder / f"demo_{i:04d}.png")
        Image.fromarray(mask.astype("uint8") * 255).save(folder / f"mask_demo_{i:04d}.png")
        rows.append([str(folder / f"demo_{i:04d}.png"), caption, str(folder / f"mask_demo_{i:04d}.png")])
    return rows


def _problem_page(message: str) -> str:
    return f"### Cannot segment this\n\n{message}"


def build_page(model: Model, examples: list[list[str]], max_pixels: int = MAX_PIXELS):
    """The Gradio Blocks: an Image tab and a Volume tab; every handler turns a Problem into a message."""
    import gradio as gr  # deferred: Gradio (requirements-app.txt) takes seconds to load

    def on_image(image_file, caption, gt_file):
        try:
            r = segment_image(model, image_file, caption or "", gt_file, max_pixels=max_pixels)
        except Problem as e:
            return None, [], _problem_page(str(e)), None
        return r["overlay"], r["heatmaps"], r["info"], r["mask_png"]

    def on_volume(volume_file, caption, intensity):
        try:
            r = segment_volume_file(model, volume_file, caption or "", intensity)
        except Problem as e:
            return None, gr.update(maximum=1, value=0), None, _problem_page(str(e)), None
        middle = r["unit"].shape[2] // 2
        return ((r["unit"], r["mask"]), gr.update(maximum=max(1, r["unit"].shape[2] - 1), value=middle),
                volume_slice(r["unit"], r["mask"], middle), r["info"], r["nifti"])

    def on_slice(state, z):
        return None if state is None else volume_slice(*state, z)

    with gr.Blocks(title="TMC: text-guided segmentation", analytics_enabled=False) as page:
        gr.Markdown("## TMC: the caption steers the mask\nGreen: the given mask; magenta: the "
                    "prediction. An empty caption means no caption (the mask from the image alone).")
        if model.error:
            gr.Markdown(_problem_page(model.error))
        with gr.Tab("Image"):
            with gr.Row():
                with gr.Column():
                    image = gr.File(label="image (PNG, JPEG, TIFF, BMP, DICOM)", elem_id="image")
                    caption = gr.Textbox(label="caption (Enter to segment; empty = no caption)",
                                         elem_id="caption")
                    gt = gr.File(label="ground-truth mask (optional: gives Dice)", elem_id="gt")
                    run = gr.Button("Segment", variant="primary", elem_id="segment")
                with gr.Column():
                    overlay = gr.Image(label="mask over the image", type="pil", elem_id="overlay")
                    info = gr.Markdown(elem_id="info")
                    mask_file = gr.File(label="mask (PNG download)", elem_id="mask")
            heat = gr.Gallery(label="MCM attention per stage (where the caption looks)", columns=4,
                              format="png", elem_id="heatmaps")
            if examples:
                gr.Examples(examples, inputs=[image, caption, gt], label="demo test images")
            outputs = [overlay, heat, info, mask_file]
            run.click(on_image, [image, caption, gt], outputs, api_name="segment_image")
            for event in (caption.submit, image.upload):  # a new caption or image: a new mask
                event(on_image, [image, caption, gt], outputs, api_name=False)
        with gr.Tab("Volume"):
            with gr.Row():
                with gr.Column():
                    volume = gr.File(label="volume (.nii / .nii.gz, or a .zip of one DICOM series)")
                    vcaption = gr.Textbox(label="caption (empty = no caption)")
                    intensity = gr.Dropdown(["auto", "ct", "mr", "minmax"], value="auto",
                                            label="intensity (auto: as the run's dataset)")
                    vrun = gr.Button("Segment volume", variant="primary")
                with gr.Column():
                    state = gr.State()
                    z = gr.Slider(0, 1, step=1, value=0, label="axial slice")
                    vslice = gr.Image(label="slice with the mask", type="pil")
                    vinfo = gr.Markdown()
                    nifti = gr.File(label="mask (.nii.gz, in the input's grid)")
            vrun.click(on_volume, [volume, vcaption, intensity], [state, z, vslice, vinfo, nifti],
                       api_name="segment_volume")
            z.change(on_slice, [state, z], vslice, api_name=False)
    return page


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="", help="a train.py best.pt ('' = the newest runs/*/best.pt)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind [127.0.0.1: this machine only]")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="", help="cpu, cuda ('' = cuda when available)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="largest image accepted")
    p.add_argument("--examples-dir", default="", help="where the demo examples are written "
                                                      "('' = a temporary folder)")
    return p


def main(argv: list[str] | None = None, block: bool = True):
    args = build_parser().parse_args(argv)
    try:
        import gradio  # noqa: F401  (deferred: an optional install, missing gets the fix below)
    except ImportError:
        fail("Gradio is not installed; fix: pip install -r requirements-app.txt")
    ckpt = Path(args.ckpt) if args.ckpt else newest_checkpoint()
    if ckpt is None:
        fail("no --ckpt given and no runs/*/best.pt here yet; fix: train one (python train.py "
             "--dataset demo, a few minutes on a CPU) or pass --ckpt PATH/best.pt")
    try:
        device = pick_device(args.device)
    except ValueError as e:
        fail(str(e))
    model = Model(ckpt, device)
    print(f"checkpoint {ckpt}: " + (f"did not load ({model.error})" if model.error else "loaded"))
    folder = Path(args.examples_dir or tempfile.mkdtemp(prefix="tmc-examples-"))
    page = build_page(model, demo_examples(folder), args.max_pixels)
    where = "this machine only" if args.host in ("127.0.0.1", "localhost") else "other machines too"
    print(f"serving on http://{args.host}:{args.port} (bound to {args.host}: {where}); Ctrl-C stops",
          flush=True)
    import gradio as gr  # deferred: Gradio (requirements-app.txt) takes seconds to load

    page.launch(server_name=args.host, server_port=args.port, share=False, ssr_mode=False,
                mcp_server=False, max_file_size="500mb", allowed_paths=[str(folder)],
                prevent_thread_lock=not block, quiet=True, footer_links=["api"],
                theme=gr.themes.Default(font=["system-ui", "sans-serif"],
                                        font_mono=["ui-monospace", "monospace"]))
    return page


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
