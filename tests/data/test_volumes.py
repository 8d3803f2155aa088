"""datasets/volumes.py, dicom_series.py and intensity.py against real files shipped in wheels
(pydicom, pydicom-data, nibabel) and against an independent reference: the DICOM standard's
pixel → patient formula, evaluated per pixel.
"""
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from datasets.records import DatasetError
from datasets import dicom_series as DS
from datasets import volumes as V
from datasets.intensity import percentile_normalise, window

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

PYDICOM_DATA = Path(pydicom.__file__).parent / "data" / "test_files"
CT5N = PYDICOM_DATA / "dicomdirtests" / "98892001" / "CT5N"
MR2 = PYDICOM_DATA / "dicomdirtests" / "98892003" / "MR2"
ANAT = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


# ---------------------------------------------------------------- fixtures and references
def write_dicom_series(folder, stored, *, iop, ipp0, spacing, step, slope=1.0, intercept=0.0,
                       uid=None, study_uid=None, description="", number=1, names=None,
                       instance_numbers=None, extra=None, photometric="MONOCHROME2"):
    """Write a native stack `stored` (Co, R, S) uint16 as one DICOM file per slice (LPS geometry)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    iop = np.asarray(iop, float)
    normal = np.cross(iop[:3], iop[3:])
    uid = uid or generate_uid()
    study_uid = study_uid or generate_uid()
    n = stored.shape[2]
    names = names or [f"{s}.dcm" for s in range(n)]
    instance_numbers = instance_numbers or list(range(1, n + 1))
    fmt = lambda v: [f"{x:.6f}" for x in v]
    for s in range(n):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, sop, "MR"
        ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "P", study_uid, uid
        ds.SeriesDescription, ds.SeriesNumber = description, number
        ds.InstanceNumber = instance_numbers[s]
        ds.ImageOrientationPatient = fmt(iop)
        ds.ImagePositionPatient = fmt(np.asarray(ipp0, float) + s * step * normal)
        ds.PixelSpacing = fmt(spacing)
        ds.SliceThickness = f"{step:.6f}"
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.6g}", f"{intercept:.6g}"
        for k, v in (extra or {}).items():
            setattr(ds, k, v[s] if isinstance(v, list) else v)
        ds.PixelData = np.ascontiguousarray(stored[:, :, s].T).astype("<u2").tobytes()  # (R, Co)
        ds.save_as(folder / names[s], enforce_file_format=True)
    return uid


def oblique_iop(deg_z=195.0, deg_x=12.0):
    """Row/column cosines of an oblique plane whose row direction points mostly to patient right."""
    a, b = np.radians(deg_z), np.radians(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    r = rz @ rx
    return np.concatenate([r[:, 0], r[:, 1]])


def check_world_positions(files, array, affine):
    """Every stored pixel, placed by the DICOM formula (LPS → RAS), holds its rescaled value."""
    inv = np.linalg.inv(affine)
    for f in files:
        ds = pydicom.dcmread(str(f))
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        dr, dc = (float(v) for v in ds.PixelSpacing)
        value = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(
            ds.get("RescaleIntercept", 0))
        r, c = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")  # (R, Co)
        lps = ipp + c[..., None] * dc * iop[:3] + r[..., None] * dr * iop[3:]  # (R, Co, 3)
        ras = np.concatenate([-lps[..., :2], lps[..., 2:], np.ones_like(lps[..., :1])], axis=-1)
        ijk = ras @ inv.T  # (R, Co, 4)
        idx = np.round(ijk[..., :3]).astype(int)
        assert np.allclose(ijk[..., :3], idx, atol=1e-3), f
        got = array[idx[..., 0], idx[..., 1], idx[..., 2]]  # (R, Co)
        assert np.allclose(got, value, rtol=1e-6, atol=1e-3), f


# ---------------------------------------------------------------- orientation of 2D views
def test_axial_slice_to_image_is_radiological_and_invertible():
    s = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)  # (X, Y): x → patient right, y → anterior
    img = V.axial_slice_to_image(s)
    assert img.shape == (4, 5)
    assert img[0, 0] == s[4, 3]  # top-left = most anterior row, patient's right
    assert img[-1, -1] == s[0, 0]  # bottom-right = posterior, patient's left
    assert np.array_equal(img, np.fliplr(np.rot90(s)))
    assert np.array_equal(V.image_to_axial_slice(img), s)


# ---------------------------------------------------------------- DICOM: real files
def test_ct5n_order_follows_position_not_instance_number():
    series = DS.list_dicom_series(CT5N)
    assert len(series) == 1 and len(series[0].files) == 5  # AcquisitionNumber 1/2 does not split it
    vol = DS.load_dicom_volume(CT5N)
    z = [float(h.ImagePositionPatient[2]) for h in vol.headers]
    inst = [int(h.InstanceNumber) for h in vol.headers]
    assert z == sorted(z) and inst == sorted(inst, reverse=True)  # InstanceNumber falls as z rises
    by_z = sorted(CT5N.iterdir(), key=lambda f: float(pydicom.dcmread(str(f)).ImagePositionPatient[2]))
    for k, f in enumerate(by_z):
        ds = pydicom.dcmread(str(f))
        expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.array_equal(V.axial_slice_to_image(vol.array[:, :, k]), expected)
    assert vol.affine[2, 2] == pytest.approx(2.5) and vol.affine[2, 3] == pytest.approx(-1.2375)
    check_world_positions(vol.files, vol.array, vol.affine)


def test_mr2_groups_by_series_uid_not_folder():
    series = DS.list_dicom_series(MR2)
    assert sorted(len(s.files) for s in series) == [1, 3, 3]
    assert sum(len(s.files) for s in series) == len(list(MR2.iterdir()))
    with pytest.raises(DatasetError, match="3 series found"):
        DS.read_dicom_series(MR2)
    pilot = next(s for s in series if len(s.files) == 3)
    with pytest.raises(DatasetError, match="mixes image orientations"):  # tri-planar localizer
        DS.read_dicom_series(MR2, pilot.uid)
    single = next(s for s in series if len(s.files) == 1)  # one sagittal-like slice
    array, affine = DS.read_dicom_series(MR2, single.uid)
    assert array.shape == (1, 16, 16)
    check_world_positions(single.files, array, affine)


def test_ct_small_rescale_to_hounsfield(tmp_path):
    src = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    (tmp_path / "CT_small.dcm").write_bytes(src.read_bytes())
    array, affine = DS.read_dicom_series(tmp_path)
    stored = pydicom.dcmread(str(src)).pixel_array
    assert stored.min() >= 0  # pydicom 3 returns stored values, not HU
    hu = V.axial_slice_to_image(array[:, :, 0])
    assert np.array_equal(hu, stored.astype(np.float32) - 1024.0)
    check_world_positions([src], array, affine)


def _external(name):
    try:
        return Path(pydicom.data.get_testdata_file(name))
    except Exception:
        return None


def test_non_integer_slope_mr2_uncr():
    path = _external("MR2_UNCR.dcm")
    if path is None or not path.exists():
        pytest.skip("pydicom-data (MR2_UNCR.dcm) not installed")
    ds = pydicom.dcmread(str(path))
    out = DS.read_dicom_image(path)
    expected = ds.pixel_array.astype(np.float64) * 3.774114 + 0.000061
    assert out.dtype == np.float32
    assert np.allclose(out, expected, rtol=1e-6, atol=1e-3)
    assert np.any(np.abs(out - np.round(out)) > 0.1)  # not truncated to integers


def test_monochrome1_is_inverted_rg1_uncr():
    path = _external("RG1_UNCR.dcm")
    if path is None or not path.exists():
        pytest.skip("pydicom-data (RG1_UNCR.dcm) not installed")
    stored = pydicom.dcmread(str(path)).pixel_array.astype(np.float64)
    out = DS.read_dicom_image(path).astype(np.float64)
    assert out.min() == stored.min() and out.max() == stored.max()  # same range, reversed
    assert np.unravel_index(out.argmax(), out.shape) == np.unravel_index(stored.argmin(), out.shape)
    sub = (slice(None, None, 37), slice(None, None, 41))
    assert np.corrcoef(out[sub].ravel(), stored[sub].ravel())[0, 1] == pytest.approx(-1.0)


# ---------------------------------------------------------------- DICOM: synthetic series
def test_oblique_shuffled_series_with_rescale(tmp_path):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4000, size=(6, 7, 5)).astype(np.uint16)  # (Co, R, S)
    names = ["1-003.dcm", "1-001.dcm", "1-005.dcm", "1-002.dcm", "1-004.dcm"]  # not spatial order
    folder = tmp_path / "series"
    write_dicom_series(folder, stored, iop=oblique_iop(), ipp0=[10.0, -20.0, 30.0],
                       spacing=[0.8, 0.7], step=2.0, slope=2.5, intercept=-100.0, names=names,
                       instance_numbers=[5, 4, 3, 2, 1])
    (folder / "LICENSE").write_text("not dicom")  # ignored, like NBIA's extra files
    vol = DS.load_dicom_volume(folder)
    assert vol.array.dtype == np.float32 and sorted(vol.array.shape) == [5, 6, 7]
    check_world_positions(vol.files, vol.array, vol.affine)
    assert np.isclose(sorted(vol.array.ravel())[0], stored.min() * 2.5 - 100.0)
    assert np.allclose(np.sign(np.diag(vol.affine)[:3]), 1.0)  # closest canonical RAS+
    # native labels map onto the RAS grid like the image does
    assert np.array_equal(vol.native_to_ras(stored.astype(np.float32) * 2.5 - 100.0), vol.array)


def test_shared_positions_split_by_temporal_tag(tmp_path):
    folder = tmp_path / "dyn"
    stored = np.arange(4 * 4 * 3, dtype=np.uint16).reshape(4, 4, 3)
    uid = write_dicom_series(folder / "a", stored, iop=[1, 0, 0, 0, 1, 0], ipp0=[0, 0, 0],
                             spacing=[1, 1], step=3.0, extra={"TemporalPositionIdentifier": 1})
    write_dicom_series(folder / "b", stored + 100, iop=[1, 0, 0, 0, 1, 0], ipp0=[0, 0, 0],
                       spacing=[1, 1], step=3.0, uid=uid, extra={"TemporalPositionIdentifier": 2})
    keys = sorted(s.key for s in DS.list_dicom_series(folder))
    assert keys == [f"{uid}:TemporalPositionIdentifier=1", f"{uid}:TemporalPositionIdentifier=2"]
    with pytest.raises(DatasetError, match="2 series found"):
        DS.read_dicom_series(folder, uid)
    second, _ = DS.read_dicom_series(folder, keys[1])
    first, _ = DS.read_dicom_series(folder, keys[0])
    assert np.array_equal(second - first, np.full_like(first, 100.0))


def test_missing_position_falls_back_to_instance_number(tmp_path):
    stored = np.stack([np.full((3, 3), v, np.uint16) for v in (30, 10, 20)], axis=-1)
    write_dicom_series(tmp_path, stored, iop=[1, 0, 0, 0, 1, 0], ipp0=[0, 0, 0], spacing=[1, 1],
                       step=1.0, instance_numbers=[3, 1, 2])
    for f in tmp_path.iterdir():
        ds = pydicom.dcmread(str(f))
        del ds.ImagePositionPatient
        ds.save_as(f)
    with pytest.warns(UserWarning, match="ordering by InstanceNumber"):
        array, _ = DS.read_dicom_series(tmp_path)
    assert list(array[0, 0, :]) == [10.0, 20.0, 30.0]


def test_corrupt_dicom_names_the_file(tmp_path):
    (tmp_path / "1-001.dcm").write_bytes(b"\x00" * 64)
    with pytest.raises(DatasetError, match="1-001.dcm"):
        DS.read_dicom_series(tmp_path)


# ---------------------------------------------------------------- NIfTI
def test_read_nifti_las_big_endian_to_ras():
    raw_img = nib.load(str(ANAT))
    raw = np.asanyarray(raw_img.dataobj)
    assert nib.aff2axcodes(raw_img.affine) == ("L", "A", "S") and raw.dtype.byteorder == ">"
    data, affine = V.read_nifti(ANAT)
    assert data.dtype == np.int16 and data.dtype.isnative
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    i, j, k = 3, 17, 9
    assert data[i, j, k] == raw[raw.shape[0] - 1 - i, j, k]  # only x is flipped
    assert np.allclose(affine @ [i, j, k, 1], raw_img.affine @ [raw.shape[0] - 1 - i, j, k, 1])
    canon = nib.as_closest_canonical(raw_img)
    assert np.array_equal(data, np.asanyarray(canon.dataobj))
    # the DICOM path's reorientation helper agrees with nibabel on the same grid
    again, again_aff = V.reorient_to_ras(raw, raw_img.affine)
    assert np.array_equal(again, data) and np.allclose(again_aff, affine)


def test_pair_stays_aligned_when_mask_is_stored_in_another_orientation(tmp_path):
    from nibabel.orientations import axcodes2ornt

    raw_img = nib.load(str(ANAT))
    raw = np.asanyarray(raw_img.dataobj).astype(np.int16)
    mask_img = nib.Nifti1Image((raw > 2000).astype(np.uint8), raw_img.affine)
    odd = mask_img.as_reoriented(axcodes2ornt(("P", "I", "R")))  # same voxels, permuted on disk
    nib.save(nib.Nifti1Image(raw, raw_img.affine), str(tmp_path / "img.nii.gz"))
    nib.save(odd, str(tmp_path / "mask.nii.gz"))
    image, mask, affine = V.read_nifti_pair(tmp_path / "img.nii.gz", tmp_path / "mask.nii.gz")
    assert mask.dtype == bool and mask.sum() > 0
    assert np.array_equal(mask, image > 2000)


def test_write_like_restores_the_input_voxel_order(tmp_path):
    data, affine = V.read_nifti(ANAT)
    pred = data > 2000
    out = V.write_nifti_like(pred, affine, tmp_path / "pred.nii.gz", like=ANAT)
    written = nib.load(str(out))
    raw_img = nib.load(str(ANAT))
    assert np.allclose(written.affine, raw_img.affine)
    assert np.array_equal(np.asanyarray(written.dataobj), np.asanyarray(raw_img.dataobj) > 2000)
    plain = V.write_nifti_like(pred, affine, tmp_path / "ras.nii")
    back, back_aff = V.read_nifti(plain)
    assert np.array_equal(back, pred) and np.allclose(back_aff, affine)


def test_pair_mismatch_and_corrupt_files_name_the_files(tmp_path):
    a = np.zeros((4, 5, 6), np.int16)
    nib.save(nib.Nifti1Image(a, np.eye(4)), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(a[:, :, :5].astype(np.uint8), np.eye(4)), str(tmp_path / "short.nii.gz"))
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    nib.save(nib.Nifti1Image(a.astype(np.uint8), shifted), str(tmp_path / "moved.nii.gz"))
    for bad in ("short.nii.gz", "moved.nii.gz"):
        with pytest.raises(DatasetError, match=rf"img\.nii\.gz and .*{bad}"):
            V.read_nifti_pair(tmp_path / "img.nii.gz", tmp_path / bad)
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DatasetError, match="broken.nii.gz"):
        V.read_nifti(tmp_path / "broken.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 2), np.int16), np.eye(4)), str(tmp_path / "4d.nii"))
    with pytest.raises(DatasetError, match="4d.nii: expected a 3D"):
        V.read_nifti(tmp_path / "4d.nii")


def test_resample_nearest_moves_labels_in_world_space():
    src = np.zeros((6, 6, 4), np.uint8)
    src[2, 3, 1] = 1
    target_aff = np.diag([1.0, 1.0, 1.0, 1.0])
    target_aff[:3, 3] = [1.0, 0.0, 0.0]  # target voxel i sits at source voxel i + 1
    out = V.resample_nearest(src, np.eye(4), (6, 6, 4), target_aff)
    assert np.argwhere(out).tolist() == [[1, 3, 1]]


# ---------------------------------------------------------------- intensities
def test_window_and_percentile_normalise():
    hu = np.array([-2000.0, -1350.0, -600.0, 150.0, 900.0])
    assert np.allclose(window(hu, -1350, 150), [0.0, 0.0, 0.5, 1.0, 1.0])
    v = np.arange(1001, dtype=np.float32)  # percentiles 0.1/99.9 of 0..1000 are 1 and 999
    out = percentile_normalise(v)
    assert out.dtype == np.float32 and out[0] == 0.0 and out[-1] == 1.0
    assert out[500] == pytest.approx((500 - 1) / (999 - 1))
    assert np.all(percentile_normalise(np.full((3, 3), 7.0)) == 0)
