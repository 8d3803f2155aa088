"""DukeReader on a small Duke-like tree: TCIA DICOM (descriptive and classic folder names), a
MAMA-MIA tree with expert masks, the TCIA spreadsheets (mapping, boxes, clinical with three header
rows) and a user text CSV. The expert mask is written through an affine computed here from the
DICOM formula, so image/mask alignment is checked independently of datasets/dicom_series.py.
"""
import warnings
from pathlib import Path

import numpy as np
import pytest

from datasets.records import DatasetError
from datasets import duke as D
from datasets.breast_caption import breast_caption
from datasets.dicom_series import DicomSeries
from tests.data.test_volumes import oblique_iop, write_dicom_series

nib = pytest.importorskip("nibabel")
openpyxl = pytest.importorskip("openpyxl")

CO, R, S = 6, 5, 6  # native columns, rows, slices of every synthetic series
TUMOUR = (slice(2, 4), slice(1, 3), slice(1, 3))  # native (Co, R, S) box of the tumour
SPACING, STEP = (0.9, 0.8), 2.0  # PixelSpacing (row, column), slice step


def native_ras_affine(iop, ipp0) -> np.ndarray:
    """RAS affine of a native (Co, R, S) stack, straight from the DICOM definitions."""
    iop = np.asarray(iop, float)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * SPACING[1]
    lps[:3, 1] = iop[3:] * SPACING[0]
    lps[:3, 2] = np.cross(iop[:3], iop[3:]) * STEP
    lps[:3, 3] = ipp0
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def stack(seed: int, enhance: float) -> np.ndarray:
    base = np.random.default_rng(seed).integers(100, 300, size=(CO, R, S)).astype(np.uint16)
    base[TUMOUR] += np.uint16(enhance)
    return base


def write_xlsx(path: Path, rows, sheet="Sheet1") -> None:
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = sheet
    for r in rows:
        ws.append(list(r))
    path.parent.mkdir(parents=True, exist_ok=True)
    wb.save(path)


@pytest.fixture(scope="module")
def duke_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("duke")
    tcia = root / "manifest-1654812109500" / "Duke-Breast-Cancer-MRI"
    iop1, ipp1 = oblique_iop(deg_z=183.0, deg_x=4.0), np.array([120.0, 80.0, -30.0])  # IOP[0] ≈ -1
    iop2, ipp2 = np.array([-1.0, 0, 0, 0, 1, 0]), np.array([100.0, 90.0, 10.0])
    shuffled = ["1-004.dcm", "1-002.dcm", "1-006.dcm", "1-001.dcm", "1-005.dcm", "1-003.dcm"]
    inverse = list(range(S, 0, -1))  # InstanceNumber falls along the slice normal
    study = tcia / "Breast_MRI_001" / "01-01-1990-NA-MRI BREAST BILATERAL WWO-97538"
    common = dict(spacing=SPACING, step=STEP, names=shuffled, instance_numbers=inverse)
    write_dicom_series(study / "3.000000-ax t1-95549", stack(0, 0), iop=iop1, ipp0=ipp1,
                       description="ax t1", extra={"AcquisitionTime": "090000"}, **common)
    for i, (desc, t) in enumerate([("ax dyn pre", "100000"), ("ax dyn 1st pass", "100100"),
                                   ("ax dyn 2nd pass", "100200")]):
        write_dicom_series(study / f"{600 + 100 * i}.000000-{desc}-{25442 + i}",
                           stack(1, 1000 * (i > 0)), iop=iop1, ipp0=ipp1, slope=1.5, intercept=-10,
                           description=desc, number=600 + 100 * i, extra={"AcquisitionTime": t},
                           **common)
    uids = []  # patient 2: classic UID folders, unlabelled series ordered by time
    for i, t in enumerate(["110000", "110100", "110200"]):
        uid = f"1.2.826.0.1.3680043.8.498.{200 + i}"
        write_dicom_series(tcia / "Breast_MRI_002" / "1.2.3.4" / uid, stack(2, 800 * (i > 0) + 400 * i),
                           iop=iop2, ipp0=ipp2, uid=uid, description="ax 3d dyn", number=i,
                           names=[f"1-{j + 1}.dcm" for j in range(S)], spacing=SPACING, step=STEP,
                           extra={"AcquisitionTime": t})
        uids.append(uid)
    # MAMA-MIA: masks on the DICOM grids, stored in the native (Co, R, S) order of each series
    mama = root / "MAMA-MIA"
    mask = np.zeros((CO, R, S), np.uint8)
    mask[TUMOUR] = 1
    mama.joinpath("segmentations", "expert").mkdir(parents=True)
    for n, (iop, ipp) in {1: (iop1, ipp1), 2: (iop2, ipp2)}.items():
        nib.save(nib.Nifti1Image(mask, native_ras_affine(iop, ipp)),
                 str(mama / "segmentations" / "expert" / f"{'DUKE' if n == 1 else 'duke'}_{n:03d}.nii.gz"))
    for k in range(3):  # patient 3: MAMA-MIA only; phase k image = 100 * k + 1000 inside the tumour
        img = np.full((CO, R, S), 100.0 * k, np.float32)
        img[TUMOUR] += 1000.0
        (mama / "images" / "DUKE_003").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(img, np.diag([-0.7, -0.7, 1.5, 1.0])),
                 str(mama / "images" / "DUKE_003" / f"DUKE_003_000{k}.nii.gz"))
    nib.save(nib.Nifti1Image(mask, np.diag([-0.7, -0.7, 1.5, 1.0])),
             str(mama / "segmentations" / "expert" / "DUKE_003.nii.gz"))
    # TCIA spreadsheets
    write_xlsx(root / "Clinical_and_Other_Features.xlsx", [
        ("Patient Information", None, "Tumor Characteristics", None, None, None, None),
        ("Patient ID ", " Mol Subtype", "Tumor Location", "Bilateral Information",
         "Multicentric/Multifocal", "Lesion type", "Nottingham grade"),
        (None, "0 = luminal-like, 1 = ER/PR pos, HER2 pos, 2 = her2, 3 = trip neg", "L/R",
         "0=no, 1=yes", "0=no, 1=yes", "0=mass, 1=non-mass", None),
        ("Breast_MRI_001", 0, "L", 0, 1, 0, 2),
        ("Breast_MRI_002", 3, "R", 1, 0, 1, None),
        ("Breast_MRI_003", None, None, None, None, None, None)], sheet="Data")
    # boxes = the tumour's bounding box: rows/columns 1-based, slices ranked by InstanceNumber
    # (spatial slices 1, 2 carry InstanceNumber 5, 4 → ranks 5, 4, not 2, 3)
    write_xlsx(root / "Annotation_Boxes.xlsx", [
        ("Patient ID", "Start Row", "End Row", "Start Column", "End Column", "Start Slice", "End Slice"),
        ("Breast_MRI_001", 2, 3, 3, 4, 4, 5)])
    write_xlsx(root / "Breast-Cancer-MRI-filepath_filename-mapping.xlsx", [
        ("original_path_and_filename", "classic_path", "descriptive_path"),
        ("DICOM_Images/Breast_MRI_002/pre/Breast_MRI_002_pre_001.dcm",
         f"Duke-Breast-Cancer-MRI/Breast_MRI_002/1.2.3.4/{uids[0]}/1-01.dcm", "x"),
        ("DICOM_Images/Breast_MRI_002/post_1/Breast_MRI_002_post_1_001.dcm",
         f"Duke-Breast-Cancer-MRI/Breast_MRI_002/1.2.3.4/{uids[2]}/1-01.dcm", "x")])
    return root


def read(root, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = D.DukeReader(root, **kw)
        out = list(reader)
    errors = [e for e in out if isinstance(e, DatasetError)]
    if errors:
        raise errors[0]
    return reader, out


def by_case(samples):
    out = {}
    for s in samples:
        out.setdefault(s.case, []).append(s)
    return out


def test_phase_rule_from_descriptions():
    mk = lambda d, t: DicomSeries(key=d + t, uid=d, description=d, number=None, time=t)
    series = [mk("ax t1", "0"), mk("ax dyn 2nd pass", "3"), mk("ax dyn pre", "1"),
              mk("ax dyn 1st pass", "2"), mk("ax dyn sub", "4"), mk("Ph3/ax 3d dyn", "5")]
    got = {p: s.description for p, s in D.assign_phases(series).items()}
    assert got == {"pre": "ax dyn pre", "post_1": "ax dyn 1st pass", "post_2": "ax dyn 2nd pass",
                   "post_3": "Ph3/ax 3d dyn"}
    unnamed = [mk("ax 3d dyn", t) for t in ("2", "0", "1")]
    assert [D.assign_phases(unnamed)[p].time for p in ("pre", "post_1", "post_2")] == ["0", "1", "2"]


def test_dicom_and_mama_mia_stay_aligned(duke_root):
    reader, out = read(duke_root, negative_share=0.0)
    cases = by_case(out)
    assert sorted(cases) == ["Breast_MRI_001", "Breast_MRI_002", "Breast_MRI_003"]
    for case, samples in cases.items():
        assert len(samples) == 2  # the two tumour slices, no negatives
        for s in samples:
            assert s.mask.any() and s.image.dtype == np.float32 and s.mask.dtype == bool
            # the enhancing tumour (post_1) is exactly where the expert mask is
            assert np.array_equal(s.mask, s.image > 0.5), case
    # patient 3 comes from the MAMA-MIA post_1 image; the others from DICOM
    assert "DUKE_003_0001" in cases["Breast_MRI_003"][0].source
    assert "Breast_MRI_001" in cases["Breast_MRI_001"][0].source


def test_mapping_file_overrides_the_header_rule(duke_root):
    mapping = duke_root / "Breast-Cancer-MRI-filepath_filename-mapping.xlsx"
    hidden = duke_root / "hidden.xlsx"
    mapping.rename(hidden)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            by_rule = D.DukeReader(duke_root)
        rule_uid = by_rule._phase_series(2).uid
    finally:
        hidden.rename(mapping)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mapped = D.DukeReader(duke_root)
    assert rule_uid.endswith(".201")  # second acquisition in time
    assert mapped._phase_series(2).uid.endswith(".202")  # what the mapping file says
    assert mapped.mapping_xlsx == mapping and mapping in mapped.sources()


def test_negative_share_is_deterministic(duke_root):
    _, a = read(duke_root, negative_share=0.5)
    _, b = read(duke_root, negative_share=0.5)
    assert [s.key for s in a] == [s.key for s in b]
    for case, samples in by_case(a).items():
        pos = [s for s in samples if s.mask.any()]
        neg = [s for s in samples if not s.mask.any()]
        assert len(pos) == 2 and len(neg) == 2  # round(0.5 × 4 tumour-free slices)
        free = [z for z in range(S) if z not in {s.slice_index for s in pos}]
        assert [s.slice_index for s in neg] == [free[1], free[3]]  # centres of 2 bins over 4


def test_text_and_strata_from_clinical_and_csv(duke_root, tmp_path):
    reader, out = read(duke_root, lesion_type_column="Lesion type")
    cases = by_case(out)
    assert cases["Breast_MRI_001"][0].text == "Left breast tumour, luminal-like subtype, mass lesion, multifocal."
    assert cases["Breast_MRI_002"][0].text == ("Right breast tumour, triple-negative subtype, "
                                              "non-mass lesion, bilateral disease.")
    assert cases["Breast_MRI_003"][0].text == "Breast tumour."
    assert [cases[c][0].stratum for c in sorted(cases)] == ["luminal-like", "trip neg", "unknown"]
    csv_path = tmp_path / "texts.csv"
    csv_path.write_text("patient,text\nDUKE_001,Irregular mass in the left breast.\n")
    _, out = read(duke_root, text_csv=csv_path)
    cases = by_case(out)
    assert cases["Breast_MRI_001"][0].text == "Irregular mass in the left breast."
    assert cases["Breast_MRI_002"][0].text.startswith("Right breast tumour")


def test_boxes_need_the_weak_label_flag_and_match_the_tumour(duke_root):
    with pytest.raises(DatasetError, match="boxes_are_weak_labels=True"):
        D.DukeReader(duke_root, mask_source="boxes")
    _, boxed = read(duke_root, mask_source="boxes", boxes_are_weak_labels=True, negative_share=0.0)
    _, expert = read(duke_root, negative_share=0.0)
    expert = {s.key: s for s in expert}
    assert len(boxed) == 2 and all(s.case == "Breast_MRI_001" for s in boxed)
    for s in boxed:  # the box is the tumour's bounding box, read through slice ranks and pixels
        assert np.array_equal(s.mask, expert[s.key].mask)


def test_mask_on_another_grid_is_resampled_onto_the_dicom_grid(duke_root, tmp_path):
    reader, out = read(duke_root, negative_share=0.0)
    before = {s.key: s.mask for s in out if s.case == "Breast_MRI_001"}
    padded = np.zeros((CO + 2, R + 2, S + 2), np.uint8)  # one voxel of margin on every side
    padded[1:-1, 1:-1, 1:-1][TUMOUR] = 1
    shift = np.eye(4)
    shift[:3, 3] = -1.0
    aff = native_ras_affine(oblique_iop(deg_z=183.0, deg_x=4.0), [120.0, 80.0, -30.0]) @ shift
    nib.save(nib.Nifti1Image(padded, aff), str(tmp_path / "DUKE_001.nii.gz"))
    reader.mama_masks[1] = tmp_path / "DUKE_001.nii.gz"
    reader.cases = [1]
    after = {s.key: s.mask for s in reader}
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_bad_inputs_are_reported(duke_root, tmp_path):
    with pytest.raises(DatasetError, match="no MAMA-MIA"):
        D.DukeReader(tmp_path)
    with pytest.raises(ValueError):
        D.DukeReader(duke_root, phase="post_9")
    reader, _ = read(duke_root)
    bad = tmp_path / "DUKE_003.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((CO, R, S - 1), np.uint8), np.diag([-0.7, -0.7, 1.5, 1.0])),
             str(bad))
    reader.mama_masks[3] = bad
    errors = [str(e) for e in reader if isinstance(e, DatasetError)]
    assert len(errors) == 1 and "DUKE_003_0001.nii.gz and" in errors[0] and str(bad) in errors[0]


# ---------------------------------------------------------------- captions from the mask
def _slice_mask(boxes, h=40, w=80):
    m = np.zeros((h, w), bool)
    for r0, r1, c0, c1 in boxes:
        m[r0:r1, c0:c1] = True
    return m


@pytest.mark.parametrize("boxes, z, expected", [
    # image columns 0-39 are the patient's right breast (outer at column 0), 40-79 the left
    ([(5, 12, 2, 9)], 0.8, "Right breast lesion, one lesion, upper outer quadrant of the right breast, 14 mm."),
    ([(5, 10, 45, 50)], 0.2, "Left breast lesion, one lesion, lower inner quadrant of the left breast, 10 mm."),
    ([(5, 10, 70, 75), (20, 30, 60, 64)], 0.5,
     "Left breast lesions, two lesions, upper outer quadrant of the left breast, largest 20 mm."),
    ([(5, 10, 30, 50)], 0.9,  # one region across the midline: one lesion per breast, not "one"
     "Bilateral breast lesions, two lesions, upper inner quadrant of the right breast and upper inner "
     "quadrant of the left breast, largest 40 mm."),
    ([], 0.5, "No breast lesion."),
])
def test_breast_caption_from_the_mask(boxes, z, expected):
    assert breast_caption(_slice_mask(boxes), z, pixel_mm=(2.0, 2.0)) == expected


def test_duke_without_clinical_text_gets_breast_captions_not_the_chest_template(duke_root, tmp_path):
    from datasets.cache import build_cache
    from datasets.cached import load_index

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader = D.DukeReader(duke_root / "MAMA-MIA", negative_share=0.5)  # no clinical sheet
        samples = list(reader)
        for i, s in enumerate(samples):  # one patient: make each slice a case to build a cache
            s.case, s.split = s.key, ("train", "val", "test")[i % 3]
        cache = build_cache(_Listed(reader, samples), tmp_path / "c", 16, split_mode="layout",
                            progress=False)
    rows = load_index(cache)
    assert len(rows) == len(samples) and all(r["text_from_mask"] for r in rows)
    assert not any("pulmonary" in r["text"] or "lung" in r["text"] for r in rows)
    assert {r["text"].split(",")[0] for r in rows} == {"Bilateral breast lesions", "No breast lesion."}
    tumour = next(s for s in samples if s.mask.any())
    assert tumour.text == breast_caption(tumour.mask, tumour.slice_index / (S - 1), (0.7, 0.7))


class _Listed:
    """A reader that yields given samples (with the wrapped reader's name, options and sources)."""

    def __init__(self, reader, samples):
        self.name, self.reader, self.samples = reader.name, reader, samples

    def sources(self):
        return self.reader.sources()

    def options(self):
        return self.reader.options()

    def __len__(self):
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)
