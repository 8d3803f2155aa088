"""datasets/demo.py: deterministic, read back like real QaTa, only the text says what to segment."""
import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image

from datasets.cache import build_cache
from datasets.cached import load_meta
from datasets.demo import DemoReader, ensure_demo, render_demo_image
from datasets.records import DatasetError
from datasets.text_from_mask import LEVELS, SIDES, mask_zones

N, SIZE = 30, 48


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _zones_in(caption):
    """(2, 3) bool parsed back from the zone words of an LViT-style caption (a slow, obvious parser)."""
    zones = np.zeros((2, 3), bool)
    for part in caption.rstrip(".").split(", ")[-1].split(" and "):
        words = part.split()
        side = SIDES.index(words[-2])
        levels = LEVELS if words[0] == "all" else words[:-2]
        for lv in levels:
            zones[side, LEVELS.index(lv)] = True
    return zones


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return ensure_demo(tmp_path_factory.mktemp("demo") / "d", n=N, size=SIZE, seed=3)


def test_deterministic_and_reused(demo_root, tmp_path):
    first = _digest(demo_root)
    stamp = (demo_root / "demo_manifest.json").stat().st_mtime_ns
    assert ensure_demo(demo_root, n=N, size=SIZE, seed=3) == demo_root
    assert (demo_root / "demo_manifest.json").stat().st_mtime_ns == stamp  # not regenerated
    other = ensure_demo(tmp_path / "again", n=N, size=SIZE, seed=3)
    assert _digest(other) == first  # byte-identical
    assert _digest(ensure_demo(tmp_path / "s4", n=N, size=SIZE, seed=4)) != first
    ensure_demo(other, n=N + 5, size=SIZE, seed=3)  # other settings replace an earlier demo
    assert len(list(other.glob("images/*/images/*.png"))) == N + 5

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="mine: folder is not empty"):
        ensure_demo(tmp_path / "mine", n=N, size=SIZE)


def test_read_back_as_qata_with_paper_split(demo_root, tmp_path):
    reader = DemoReader(demo_root, n=N, size=SIZE, seed=3)
    assert reader.name == "demo" and reader.layout == "sgseg" and len(reader) == N
    cache = build_cache(reader, tmp_path / "c", 32, seed=3, progress=False)
    meta = load_meta(cache)
    assert meta["counts"] == {"train": 21, "val": 3, "test": 6}
    assert meta["text_from_mask"] == 0 and meta["reader_options"]["size"] == SIZE
    # written folders follow the same paper split, so layout mode agrees with it
    cache2 = build_cache(reader, tmp_path / "c2", 32, split_mode="layout", progress=False)
    assert load_meta(cache2)["counts"] == meta["counts"]


def test_caption_names_exactly_the_mask_zones(demo_root):
    ann = json.loads((demo_root / "prompts" / "annotation.json").read_text())
    entries = [(split, e) for split, es in ann.items() for e in es]
    assert len(entries) == N
    for split, e in entries:
        mask = np.asarray(Image.open(demo_root / "images" / split / "masks" / e["image_path"])) > 0
        caption = e["caption"]
        assert re.fullmatch(r"(Unilateral|Bilateral) pulmonary infection, \w+ infected areas?, "
                            r"[a-z ]+ lung( and [a-z ]+ lung)?\.", caption), caption
        np.testing.assert_array_equal(_zones_in(caption), mask_zones(mask))
        np.testing.assert_array_equal(_zones_in(caption).reshape(-1), e["pseudo_label"])
        assert any(e["distractor_zones"])


def test_text_is_decisive_and_distractors_look_alike():
    target_px, distractor_px = [], []
    for i in range(N):
        image, mask, caption, info = render_demo_image(3, i, SIZE)
        union = info["union"]
        assert mask.any() and (mask <= union).all() and (union & ~mask).any()
        assert (info["targets"] <= info["blobs"]).all() and (info["blobs"] & ~info["targets"]).any()
        assert not (mask_zones(union & ~mask) & mask_zones(mask)).any()  # distractors elsewhere
        target_px.append(image[mask].astype(float))
        distractor_px.append(image[union & ~mask].astype(float))
    t, d = np.concatenate(target_px), np.concatenate(distractor_px)
    # same generator: an image-only model sees no difference in brightness or spread
    assert abs(t.mean() - d.mean()) < 0.05 * 255 and abs(t.std() - d.std()) < 0.05 * 255


def test_lesion_radius_sets_blob_size_and_is_part_of_the_settings(demo_root, tmp_path):
    """Blob area grows with the lesion setting (about as its square, less where a zone clips it), and
    another setting is another demo: the folder is regenerated, not reused."""
    def mean_blob_px(lesion):
        from scipy import ndimage
        areas = []
        for i in range(N):
            labels, n = ndimage.label(render_demo_image(3, i, 64, lesion)[3]["union"])
            areas += [(labels == k).sum() for k in range(1, n + 1)]
        return np.mean(areas)

    small, large = mean_blob_px(0.075), mean_blob_px(0.1125)
    assert 1.3 < large / small < 1.5 ** 2
    settings = json.loads((demo_root / "demo_manifest.json").read_text())["settings"]
    assert settings["lesion"] == 0.1125
    other = ensure_demo(tmp_path / "v1", n=N, size=SIZE, seed=3, lesion=0.075)
    assert _digest(other) != _digest(demo_root)
    with pytest.raises(ValueError, match="lesion radius"):
        ensure_demo(tmp_path / "bad", n=N, size=SIZE, lesion=0.5)
