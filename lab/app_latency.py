"""Seconds from a new caption to its mask on app.py's page, over HTTP, for a preset at its own size.

    python -m lab.app_latency --preset small --calls 20

Serves the page in this process on a free local port with a randomly initialised model of the preset
(its text encoder as the preset builds it: the packaged MiniLM for small), then asks for the mask of
one demo image rendered at the preset's size with alternating captions through Gradio's client,
which is what a caption change on the page costs: the request, tokenising, one forward pass with
attention, the pictures and the mask PNG. Prints the median and the slowest call.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import app
from datasets.demo import render_demo_image
from tmc.checkpoint import save_checkpoint, text_config_of
from tmc.config import get_config
from tmc.model import build_model

CAPTIONS = ("Unilateral pulmonary infection, one infected area, lower right lung.",
            "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=("tiny", "small", "paper"))
    p.add_argument("--calls", type=int, default=20, help="timed calls (after 2 warm-up calls)")
    args = p.parse_args(argv)

    # deferred: Gradio's client (requirements-app.txt) is heavy to import
    from gradio_client import Client, handle_file

    torch.manual_seed(0)
    cfg = get_config(args.preset)
    model = build_model(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_checkpoint(tmp / "best.pt", {"model": model.state_dict(), "model_config": cfg.to_dict(),
                                          "text_config": text_config_of(model), "train_config": {}})
        Image.fromarray(render_demo_image(0, 7, size=cfg.image_size)[0]).save(tmp / "x.png")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        page = app.main(["--ckpt", str(tmp / "best.pt"), "--port", str(port), "--device", "cpu",
                         "--examples-dir", str(tmp / "examples")], block=False)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp / "dl"))
        times = []
        for k in range(args.calls + 2):
            start = time.perf_counter()
            client.predict(handle_file(str(tmp / "x.png")), CAPTIONS[k % 2], None, api_name="/segment_image")
            if k >= 2:
                times.append(time.perf_counter() - start)
        page.close()
    print(f"{args.preset} preset at {cfg.image_size}x{cfg.image_size}, {torch.get_num_threads()} CPU "
          f"thread(s): caption → mask {statistics.median(times):.3f} s median, {max(times):.3f} s slowest "
          f"of {len(times)} calls")


if __name__ == "__main__":
    main()
