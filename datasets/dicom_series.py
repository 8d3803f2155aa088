"""DICOM series: finding the image series of a folder, ordering their slices, and one volume in RAS+.

A series is found by its SeriesInstanceUID, never by its folder (one folder may hold several, one
series may span folders), and its slices are ordered by position, not by file name. This is the
part of volume reading that needs pydicom and the DICOM geometry, apart from the NIfTI files and
the orientation conventions of datasets/volumes.py, which it follows.

Shape key: `X, Y, Z` volume axes in RAS+ voxel order, `R, Co` DICOM pixel rows/columns, `S`
slices of a series.

DICOM world coordinates are LPS; the affine is built in LPS from ImageOrientationPatient (IOP),
ImagePositionPatient (IPP), PixelSpacing and the slice step, then converted to RAS by negating x
and y (`diag(-1, -1, 1)`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datasets.images import DICOM_SUFFIXES
from datasets.records import DatasetError
from datasets.volumes import reorient_to_ras

__all__ = ["DicomSeries", "list_dicom_series", "read_dicom_image", "DicomVolume",
           "load_dicom_volume", "read_dicom_series"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_NON_IMAGE_MODALITIES = {"SEG", "SR", "RTSTRUCT", "PR", "KO", "REG", "RTPLAN", "RTDOSE"}
_SPLIT_TAGS = ("TemporalPositionIdentifier", "AcquisitionNumber", "TriggerTime", "AcquisitionTime")


@dataclass
class DicomSeries:
    """One volume's worth of DICOM images (a SeriesInstanceUID, or part of one, see `key`)."""

    key: str  # the SeriesInstanceUID, or "<uid>:<Tag>=<value>" when images share positions
    uid: str
    description: str
    number: int | None
    time: str  # AcquisitionTime (else SeriesTime) of its earliest image, "" if absent
    files: list[Path] = field(default_factory=list)
    headers: list = field(default_factory=list, repr=False)  # pydicom Datasets without pixels


def _floats(value, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.size == n else None


def _read_header(path: Path):
    # pydicom only once a series is read: Duke with NIfTI images and eval.py import this module too
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except InvalidDicomError:
        if path.suffix.lower() in (*DICOM_SUFFIXES, ".ima"):
            raise DatasetError(f"{path}: not a readable DICOM file; fix: re-download it") from None
        return None  # LICENSE, metadata.csv, DICOMDIR-less junk
    except Exception as e:
        raise DatasetError(f"{path}: corrupt DICOM header ({type(e).__name__}: {e}); fix: "
                           "re-download this file") from e


def _split_shared_positions(uid: str, items: list) -> list[tuple[str, list]]:
    """Split one series whose images share positions (several phases/times) into sub-volumes."""
    def pos(h):
        p = _floats(h.get("ImagePositionPatient"), 3)
        return None if p is None else tuple(np.round(p, 3))

    positions = [pos(h) for _, h in items]
    if None in positions or len(set(positions)) == len(positions):
        return [(uid, items)]
    for tag in _SPLIT_TAGS:
        values = [h.get(tag) for _, h in items]
        if any(v is None or v == "" for v in values):
            continue
        groups: dict = {}
        for (f, h), v in zip(items, values):
            groups.setdefault(str(v), []).append((f, h))
        if len(groups) > 1 and all(len({pos(h) for _, h in g}) == len(g) for g in groups.values()):
            return [(f"{uid}:{tag}={v}", g) for v, g in groups.items()]
    return [(uid, items)]  # reading it will report the shared positions


def list_dicom_series(folder) -> list[DicomSeries]:
    """All image series under `folder` (any depth), grouped by SeriesInstanceUID, never by folder.

    A series whose images share positions (several temporal phases stored together) is split by
    TemporalPositionIdentifier, AcquisitionNumber, TriggerTime or AcquisitionTime, the first tag
    that gives sub-volumes with one image per position. Non-image objects (SEG, SR, ...) are skipped.
    Files are read without pixel data. Returns series sorted by (time, number, key).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: DICOM folder not found; fix: pass the series folder")
    by_uid: dict[str, list] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h = _read_header(path)
        if h is None or "SeriesInstanceUID" not in h or "Rows" not in h:
            continue
        if str(h.get("Modality", "")).upper() in _NON_IMAGE_MODALITIES:
            continue
        by_uid.setdefault(str(h.SeriesInstanceUID), []).append((path, h))
    out = []
    for uid, items in by_uid.items():
        for key, group in _split_shared_positions(uid, items):
            h0 = group[0][1]
            times = sorted(str(h.get("AcquisitionTime") or h.get("SeriesTime") or "") for _, h in group)
            number = h0.get("SeriesNumber")
            out.append(DicomSeries(key=key, uid=uid, description=str(h0.get("SeriesDescription", "")),
                                   number=int(number) if number not in (None, "") else None,
                                   time=times[0], files=[f for f, _ in group],
                                   headers=[h for _, h in group]))
    out.sort(key=lambda s: (s.time, s.number if s.number is not None else -1, s.key))
    return out


def _pick_series(folder: Path, series_uid: str | None) -> DicomSeries:
    found = list_dicom_series(folder)
    if not found:
        raise DatasetError(f"{folder}: no DICOM image series found; fix: pass the folder that "
                           "holds the .dcm files")
    if series_uid is not None:
        keys = ", ".join(s.key for s in found)
        found = [s for s in found if series_uid in (s.key, s.uid)]
        if not found:
            raise DatasetError(f"{folder}: no series {series_uid!r}; fix: --series-uid with one of "
                               f"{keys}")
    if len(found) > 1:
        listing = "; ".join(f"{s.key} ({s.description!r}, {len(s.files)} images)" for s in found)
        raise DatasetError(f"{folder}: {len(found)} series found: {listing}; fix: choose "
                           "one with --series-uid KEY")
    return found[0]


def _pixels(path: Path) -> np.ndarray:
    """Stored pixels of one single-frame image → float32 after RescaleSlope/Intercept (R, Co)."""
    import pydicom  # deferred: only reading a series needs it (see _read_header)

    try:
        ds = pydicom.dcmread(str(path))
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DatasetError(f"{path}: multi-frame DICOM is not supported; fix: convert the "
                               "series to NIfTI (e.g. dcm2niix) and pass the .nii.gz")
        stored = ds.pixel_array
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"{path}: cannot decode pixel data ({type(e).__name__}: {e}); fix: "
                           "install pylibjpeg/gdcm for compressed DICOM, or re-download") from e
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    # cast before rescaling: uint16 * slope overflows or truncates
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32)  # (R, Co)


def read_dicom_image(path) -> np.ndarray:
    """One 2D DICOM image (R, Co) float32: rescaled, MONOCHROME1 inverted (bright = dense)."""
    import pydicom  # deferred: only reading a series needs it (see _read_header)

    path = Path(path)
    img = _pixels(path)
    if str(pydicom.dcmread(str(path), stop_before_pixels=True).get("PhotometricInterpretation",
                                                                    "")) == "MONOCHROME1":
        img = img.max() + img.min() - img  # MONOCHROME1: low values display white
    return img


def _order_and_geometry(series: DicomSeries, where: str):
    """Spatial order of the files and the LPS affine of the native (Co, R, S) stack."""
    hs = series.headers
    iops = [_floats(h.get("ImageOrientationPatient"), 6) for h in hs]
    if any(o is None for o in iops):
        warnings.warn(f"{where}: ImageOrientationPatient missing; assuming axial 1,0,0,0,1,0")
        iops = [np.array([1.0, 0, 0, 0, 1, 0])] * len(hs)
    if any(not np.allclose(o, iops[0], atol=1e-3) for o in iops):
        raise DatasetError(f"{where}: series {series.key} mixes image orientations (a localizer?); "
                           "fix: pick a series with one orientation")
    row, col = iops[0][:3], iops[0][3:]
    normal = np.cross(row, col)
    ipps = [_floats(h.get("ImagePositionPatient"), 3) for h in hs]
    spacing = _floats(hs[0].get("PixelSpacing"), 2)
    if spacing is None or np.any(spacing <= 0):
        warnings.warn(f"{where}: PixelSpacing missing or zero; using 1 mm")
        spacing = np.ones(2)
    thick = float(hs[0].get("SpacingBetweenSlices") or hs[0].get("SliceThickness") or 1.0)
    if all(p is not None for p in ipps):
        proj = np.array([p @ normal for p in ipps])
        order = list(np.argsort(proj, kind="stable"))
        steps = np.diff(proj[order])
        if steps.size and steps.min() < 1e-3:
            raise DatasetError(f"{where}: {len(hs)} images of series {series.key} share a slice "
                               "position and no tag separates them; fix: export each phase as "
                               "its own series")
        if steps.size and steps.max() - steps.min() > 0.01 * steps.mean() + 1e-3:
            warnings.warn(f"{where}: non-uniform slice spacing ({steps.min():.3f}..{steps.max():.3f}"
                          " mm, missing slices?); the affine uses the mean step")
        origin = ipps[order[0]]
        step = ((ipps[order[-1]] - origin) / (len(order) - 1) if len(order) > 1
                else normal * thick)
    else:
        warnings.warn(f"{where}: ImagePositionPatient missing; ordering by InstanceNumber")
        inst = [h.get("InstanceNumber") for h in hs]
        order = (list(np.argsort([int(i) for i in inst], kind="stable"))
                 if all(i not in (None, "") for i in inst) else list(range(len(hs))))
        origin = ipps[order[0]] if ipps[order[0]] is not None else np.zeros(3)
        step = normal * thick
    lps = np.eye(4)
    lps[:3, 0] = row * spacing[1]  # column index moves along the row direction (column spacing)
    lps[:3, 1] = col * spacing[0]  # row index moves along the column direction (row spacing)
    lps[:3, 2] = step
    lps[:3, 3] = origin
    return order, lps


@dataclass
class DicomVolume:
    """A DICOM series read into RAS+, with what is needed to map native (Co, R, S) labels onto it."""

    array: np.ndarray  # (X, Y, Z) float32, RAS+
    affine: np.ndarray  # (4, 4) RAS+
    files: list[Path]  # files in native stack order (slice s of the (Co, R, S) stack)
    headers: list
    native_affine: np.ndarray  # (4, 4) RAS affine of the native (Co, R, S) stack

    def native_to_ras(self, native: np.ndarray) -> np.ndarray:
        """Labels drawn on the native stack (Co, R, S) → this volume's (X, Y, Z) voxel order."""
        return reorient_to_ras(native, self.native_affine)[0]


def load_dicom_volume(folder, series_uid: str | None = None) -> DicomVolume:
    """Read one series (see `read_dicom_series`) and keep its file order and native geometry.

    `folder` may also be a `DicomSeries` from `list_dicom_series` (its headers are reused).
    """
    if isinstance(folder, DicomSeries):
        series = folder
        folder = series.files[0].parent
    else:
        folder = Path(folder)
        series = _pick_series(folder, series_uid)
    where = f"{folder} (series {series.description!r})"
    order, lps = _order_and_geometry(series, where)
    files = [series.files[i] for i in order]
    headers = [series.headers[i] for i in order]
    slices = [_pixels(f) for f in files]  # each (R, Co)
    if len({s.shape for s in slices}) != 1:
        raise DatasetError(f"{where}: images of different sizes in one series; fix: pick another")
    native = np.stack([s.T for s in slices], axis=-1)  # (Co, R, S)
    if str(headers[0].get("PhotometricInterpretation", "")) == "MONOCHROME1":
        native = native.max() + native.min() - native
    ras_native = _LPS_TO_RAS @ lps
    array, affine = reorient_to_ras(native, ras_native)  # (X, Y, Z)
    return DicomVolume(np.ascontiguousarray(array, dtype=np.float32), affine, files, headers,
                       ras_native)


def read_dicom_series(folder, series_uid: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read one DICOM series as (array (X, Y, Z) float32, affine (4, 4)) in RAS+.

    Images are grouped by SeriesInstanceUID (anywhere under `folder`), ordered by the projection of
    ImagePositionPatient on the slice normal cross(IOP[:3], IOP[3:]) (InstanceNumber only when IPP
    is missing, with a warning), rescaled with RescaleSlope/Intercept in float, MONOCHROME1
    inverted, then reoriented to the closest canonical RAS+ order.

    Args:
        folder: folder holding the series (sub-folders are searched too).
        series_uid: a SeriesInstanceUID or a `DicomSeries.key`; required when several are found.
    """
    vol = load_dicom_volume(folder, series_uid)
    return vol.array, vol.affine
