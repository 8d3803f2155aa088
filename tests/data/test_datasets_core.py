"""datasets/images.py, text_from_mask.py, splits.py and augment.py against hand-computed references."""
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from tmc.augment import augment_batch, rotate_batch
from datasets.images import image_key, read_image, read_image_and_mask, read_mask
from tmc.grid import resize_image, resize_mask
from datasets.records import DatasetError
from datasets.splits import apportion, assign_splits, check_no_leak
from datasets.text_from_mask import caption_from_mask, mask_zones

# ---------------------------------------------------------------------------- images


def _save(path, arr, **kw):
    Image.fromarray(arr).save(path, **kw)
    return path


def test_read_image_8bit_rgb_rgba_16bit(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    out = read_image(_save(tmp_path / "g.png", gray))
    assert out.dtype == np.float32 and out.shape == (9, 7)
    np.testing.assert_array_equal(out, gray / np.float32(255))

    rgb = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    c = rgb.astype(np.int64)
    lum = (c[..., 0] * 299 + c[..., 1] * 587 + c[..., 2] * 114) / 1000 / 255  # ITU-R 601
    np.testing.assert_allclose(read_image(_save(tmp_path / "c.png", rgb)), lum, atol=1 / 255)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (9, 7, 1), dtype=np.uint8)], -1)
    np.testing.assert_allclose(read_image(_save(tmp_path / "a.png", rgba)), lum, atol=1 / 255)

    deep = rng.integers(100, 4000, (9, 7)).astype(np.uint16)  # 12-bit data in a 16-bit PNG
    out = read_image(_save(tmp_path / "d.png", deep))
    np.testing.assert_allclose(out, (deep - deep.min()) / (deep.max() - deep.min()), atol=1e-6)


def test_read_dicom_monochrome1_is_inverted_and_multiframe_refused():
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm")  # CR, MONOCHROME1 (pydicom-data)
    if path is None:
        pytest.skip("pydicom-data not installed")
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1)) \
        + float(getattr(ds, "RescaleIntercept", 0))
    expected = 1 - (raw - raw.min()) / (raw.max() - raw.min())  # high stored value = dark
    np.testing.assert_allclose(read_image(path), expected, atol=1e-6)

    multi = get_testdata_file("emri_small.dcm")  # 10 frames
    with pytest.raises(DatasetError, match="emri_small.dcm.*frames"):
        read_image(multi)


def test_read_mask_rules(tmp_path):
    m = np.zeros((12, 12), np.uint8)
    m[3:7, 2:9] = 1
    np.testing.assert_array_equal(read_mask(_save(tmp_path / "m01.png", m)), m == 1)
    np.testing.assert_array_equal(read_mask(_save(tmp_path / "m255.png", m * 255)), m == 1)
    pal = Image.fromarray(m, mode="L").convert("P")  # palette PNG: indices 0/1
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "pal.png"), m == 1)

    labels = m.copy()
    labels[8:10, 8:10] = 2
    with pytest.raises(DatasetError, match=r"labels\.png.*3 distinct values"):
        read_mask(_save(tmp_path / "labels.png", labels))
    with pytest.raises(DatasetError, match=r"grey\.png.*background 0"):
        read_mask(_save(tmp_path / "grey.png", (m * 127 + 128).astype(np.uint8)))

    big = np.zeros((64, 64), np.uint8)
    big[10:40, 20:50] = 255
    _save(tmp_path / "m.jpg", big, quality=75)  # lossy: many values near 0 and 255
    assert len(np.unique(np.asarray(Image.open(tmp_path / "m.jpg")))) > 2
    assert (read_mask(tmp_path / "m.jpg") != (big > 0)).mean() < 0.01


def test_corrupt_and_missing_files_name_the_file(tmp_path):
    good = _save(tmp_path / "ok.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "broken.png").write_bytes(good.read_bytes()[:40])
    with pytest.raises(DatasetError, match="broken.png"):
        read_image(tmp_path / "broken.png")
    with pytest.raises(DatasetError, match="nothere.png.*not found"):
        read_mask(tmp_path / "nothere.png")


def test_image_and_mask_of_different_sizes_name_both_files_and_the_fix(tmp_path):
    image = _save(tmp_path / "case1.png", np.zeros((8, 8), np.uint8))
    mask = _save(tmp_path / "mask_case1.png", np.zeros((8, 6), np.uint8))
    with pytest.raises(DatasetError, match=r"mask_case1.png: mask size \(8, 6\) differs from its image case1.png "
                                           r"\(8, 8\) \(list.csv line 3\).*fix: re-export the mask"):
        read_image_and_mask(image, mask, " (list.csv line 3)")
    same = _save(tmp_path / "mask_ok.png", np.full((8, 8), 255, np.uint8))
    img, msk = read_image_and_mask(image, same)
    assert img.shape == msk.shape == (8, 8) and msk.all()


def test_resize_mask_is_nearest_and_image_is_antialiased():
    rng = np.random.default_rng(1)
    mask = rng.random((50, 48)) > 0.7  # sizes chosen so that no output centre falls on a tie
    out = resize_mask(mask, 24)
    rows = np.floor((np.arange(24) + 0.5) * 50 / 24).astype(int)  # nearest source pixel centres
    cols = np.floor((np.arange(24) + 0.5) * 48 / 24).astype(int)
    np.testing.assert_array_equal(out, mask[np.ix_(rows, cols)])

    checker = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)
    small = resize_image(checker, 16)  # antialiased: the 1-pixel pattern averages out
    assert small.dtype == np.float32 and small.shape == (16, 16)
    np.testing.assert_allclose(small, 0.5, atol=0.01)


def test_image_key_normalisation():
    for name in ("mask_covid_1.png", "covid_1.png", "mask_covid_1", "COVID_1", "x/y/Mask_Covid_1.PNG"):
        assert image_key(name) == "covid_1", name
    assert image_key("sub-S1_ses-E2_dx.png") == "sub-s1_ses-e2_dx"


# ---------------------------------------------------------------------------- captions

def _mask(boxes, size=60):
    m = np.zeros((size, size), bool)
    for r0, r1, c0, c1 in boxes:
        m[r0:r1, c0:c1] = True
    return m


# 60 x 60: rows 0-19 upper, 20-39 middle, 40-59 lower; columns 0-29 image-left, 30-59 image-right.
@pytest.mark.parametrize("boxes, expected", [
    ([], "No pulmonary infection."),
    ([(2, 8, 5, 10)], "Unilateral pulmonary infection, one infected area, upper left lung."),
    ([(2, 8, 5, 10), (45, 50, 40, 50)],
     "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."),
    ([(2, 8, 5, 10), (10, 15, 15, 20)],
     "Unilateral pulmonary infection, two infected areas, upper left lung."),
    ([(5, 55, 8, 12)], "Unilateral pulmonary infection, one infected area, all left lung."),
    ([(5, 35, 8, 12), (45, 50, 40, 50)],
     "Bilateral pulmonary infection, two infected areas, upper middle left lung and lower right lung."),
    ([(5, 10, 5, 10), (10, 15, 10, 15)],  # touching diagonally: one 8-connected area
     "Unilateral pulmonary infection, one infected area, upper left lung."),
])
def test_caption_from_mask(boxes, expected):
    assert caption_from_mask(_mask(boxes)) == expected


def test_caption_sides_styles_and_counts():
    m = _mask([(2, 8, 5, 10)])
    assert caption_from_mask(m, side="radiological").endswith("upper right lung.")
    full_left = _mask([(5, 55, 8, 12)])
    assert caption_from_mask(full_left, style="sgseg") == \
        "unilateral pulmonary infection, three infected areas, upper middle lower left lung."
    np.testing.assert_array_equal(mask_zones(full_left), [[1, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(mask_zones(full_left, side="radiological"), [[0, 0, 0], [1, 1, 1]])
    dots = _mask([(r, r + 1, 40, 41) for r in range(1, 24, 2)])  # 12 separate dots
    assert "twelve infected areas, upper middle right lung" in caption_from_mask(dots)


# ---------------------------------------------------------------------------- splits

def test_apportion_floor_or_ceil():
    for n in range(0, 40):
        counts = apportion(n, (0.7, 0.1, 0.2))
        assert sum(counts) == n
        for c, r in zip(counts, (0.7, 0.1, 0.2)):
            assert np.floor(n * r) <= c <= np.ceil(n * r)


def test_assign_splits_exact_deterministic_order_free():
    cases = [f"p{i:04d}" for i in range(1000)]
    a = assign_splits(cases, seed=0)
    assert Counter(a.values()) == {"train": 700, "val": 100, "test": 200}
    assert assign_splits(list(reversed(cases)), seed=0) == a  # independent of input order
    assert assign_splits(cases, seed=1) != a
    many = [c for c in cases[:50] for _ in range(3)]  # several images per patient
    b = assign_splits(many, seed=0)
    assert sorted(b) == sorted(cases[:50])


def test_assign_splits_stratified_proportions():
    sizes = {"CT-0": 37, "CT-1": 150, "CT-2": 11, "CT-3": 2, "CT-4": 23}
    cases, strata = [], []
    for s, n in sizes.items():
        cases += [f"{s}-{i}" for i in range(n)]
        strata += [s] * n
    out = assign_splits(cases, strata, seed=3)
    ratios = (0.7, 0.1, 0.2)
    for s, n in sizes.items():
        got = Counter(out[c] for c in cases if c.startswith(s + "-"))
        for split, r in zip(("train", "val", "test"), ratios):
            assert np.floor(n * r) <= got[split] <= np.ceil(n * r), (s, split, got)
    total = Counter(out.values())
    for split, r in zip(("train", "val", "test"), ratios):
        assert abs(total[split] - len(cases) * r) <= 1


def test_check_no_leak():
    rows = [{"case": "a", "split": "train"}, {"case": "a", "split": "train"},
            {"case": "b", "split": "test"}]
    check_no_leak(rows)
    with pytest.raises(DatasetError, match="a: test/train"):
        check_no_leak(rows + [{"case": "a", "split": "test"}])


# ---------------------------------------------------------------------------- augmentation

def _dihedral(x):
    """The 8 rotations/flips of an (H, W) array."""
    out = []
    for k in range(4):
        r = np.rot90(x, k)
        out += [r, r[:, ::-1]]
    return out


def test_augment_rot90_flips_exact_and_identical():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(16, 2, 12, 12, generator=g)
    mask = (image[:, :1] > 0.5).float()
    img2, mask2 = augment_batch(image, mask, generator=torch.Generator().manual_seed(5),
                                p_rotate=0.0)
    assert img2.shape == image.shape and mask2.shape == mask.shape
    seen = set()
    for b in range(16):
        # the mask got exactly the transform of the image channel it was cut from
        torch.testing.assert_close(mask2[b, 0], (img2[b, 0] > 0.5).float(), rtol=0, atol=0)
        hits = [i for i, d in enumerate(_dihedral(image[b, 0].numpy()))
                if np.array_equal(d, img2[b, 0].numpy())]
        assert hits, "not a rotation/flip of the input"
        for d in _dihedral(image[b, 1].numpy()):  # both channels moved together
            if np.array_equal(d, img2[b, 1].numpy()):
                break
        else:
            raise AssertionError("channel 1 transformed differently")
        seen.add(hits[0])
    assert len(seen) >= 4  # the draws actually vary


def test_augment_rotation_same_for_image_and_mask_and_binary():
    m = np.zeros((8, 1, 40, 40), np.float32)
    m[:, :, 8:20, 10:30] = 1
    m[:, :, 25:33, 5:12] = 1
    mask = torch.from_numpy(m)
    image = mask.repeat(1, 3, 1, 1)  # the mask copied into every image channel
    img2, mask2 = augment_batch(image, mask, generator=torch.Generator().manual_seed(2),
                                p_rotate=1.0, rot90=False, p_flip=0.0)
    assert set(mask2.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask, torch.from_numpy(m))  # inputs untouched
    assert not torch.equal(mask2, mask)
    agree = ((img2[:, :1] > 0.5).float() == mask2).float().mean(dim=(1, 2, 3))
    assert agree.min() > 0.98  # bilinear vs nearest differ only on the outline
    again = augment_batch(image, mask, generator=torch.Generator().manual_seed(2),
                          p_rotate=1.0, rot90=False, p_flip=0.0)
    assert torch.equal(again[1], mask2)


@pytest.mark.parametrize("angle", [15.0, -20.0, 90.0])
def test_rotate_batch_matches_scipy(angle):
    ndimage = pytest.importorskip("scipy.ndimage")
    m = np.zeros((33, 33), np.float32)
    m[4:12, 13:19] = 1
    m[20:24, 3:30] = 1
    ours = rotate_batch(torch.from_numpy(m)[None, None], torch.tensor([angle]), "nearest")[0, 0]
    ref = ndimage.rotate(m, angle, reshape=False, order=0)
    assert (ours.numpy() != ref).mean() < 0.005


def test_swap_caption_sides_follows_the_flips():
    from tmc.augment import swap_caption_sides

    cap = "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."
    assert swap_caption_sides(cap, False, False) == cap
    assert swap_caption_sides(cap, True, False) == (
        "Bilateral pulmonary infection, two infected areas, upper right lung and lower left lung.")
    assert swap_caption_sides(cap, False, True) == (
        "Bilateral pulmonary infection, two infected areas, lower left lung and upper right lung.")
    assert swap_caption_sides("Upper middle left lung.", True, True) == "Lower middle right lung."
    assert swap_caption_sides("all left lung", True, False) == "all right lung"


def test_text_consistent_augmentation_keeps_captions_true():
    from tmc.augment import augment_training_batch
    from datasets.text_from_mask import caption_from_mask

    # one blob well inside the upper-left zone (image sides), small enough to stay there when rotated
    mask = torch.zeros(16, 1, 96, 96)
    mask[:, :, 12:20, 20:28] = 1
    caption = caption_from_mask(mask[0, 0].numpy() > 0)
    assert "upper left" in caption
    image = mask.clone()
    out_img, out_mask, out_caps = augment_training_batch(image, mask, [caption] * 16, "text-consistent",
                                                         generator=torch.Generator().manual_seed(0))
    assert len(set(out_caps)) > 1  # some samples were flipped
    for m, c in zip(out_mask[:, 0], out_caps):
        assert caption_from_mask(m.numpy() > 0) == c
    # image and mask moved together (bilinear vs nearest differ only along the blob's edge)
    assert ((out_img > 0.5).float() - out_mask).abs().mean() < 0.002
    same = augment_training_batch(image, mask, [caption] * 16, "none")
    assert same[2] == [caption] * 16 and torch.equal(same[1], mask)
    with pytest.raises(ValueError):
        augment_training_batch(image, mask, [caption] * 16, "mixup")


def test_a_lesion_across_the_midline_is_not_bilateral_with_one_area():
    across = _mask([(20, 30, 20, 40)])  # one 8-connected region over both halves
    assert caption_from_mask(across) == ("Bilateral pulmonary infection, two infected areas, "
                                         "middle left lung and middle right lung.")
