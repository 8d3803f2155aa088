"""CT/MR volumes in one orientation (RAS+), NIfTI files, and axial slices as 2D images.

Shape key: `X, Y, Z` volume axes in RAS+ voxel order, `H, W` image rows/columns.

Conventions (exact; the readers, the cache and `eval.py --volume` all rely on them):
- Every volume is returned as an array (X, Y, Z) plus a 4x4 affine (voxel index → world mm) in
  nibabel's RAS+ world (+x patient Right, +y Anterior, +z Superior), reoriented to the closest
  canonical voxel order: index i grows toward the patient's Right, j toward Anterior, k toward
  Superior (nibabel `as_closest_canonical`; permutations and flips only, never resampling).
- Axial slice k is `volume[:, :, k]`, shape (X, Y).
- `axial_slice_to_image(s)` = `s[::-1, ::-1].T` = `np.fliplr(np.rot90(s))`, shape (H=Y, W=X), is the
  usual radiological axial view: row 0 is the most Anterior row, rows run anterior → posterior;
  column 0 is the patient's Right, columns run right → left (the patient's right on the viewer's
  left). For a standard axial DICOM (IOP 1,0,0,0,1,0) it equals the stored `pixel_array`.
  `image_to_axial_slice(img)` = `img.T[::-1, ::-1]` is its exact inverse.
DICOM series are read into the same convention by datasets/dicom_series.py; intensities are
scaled to [0, 1] by datasets/intensity.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from datasets.records import DatasetError

__all__ = ["axial_slice_to_image", "image_to_axial_slice", "reorient_to_ras", "reorient_like",
           "resample_nearest", "spread_indices", "read_nifti", "read_nifti_pair", "write_nifti_like"]


# ---------------------------------------------------------------- orientation helpers
def axial_slice_to_image(slice_xy: np.ndarray) -> np.ndarray:
    """RAS+ axial slice (X, Y) → radiological image (H=Y, W=X): rows A→P, columns patient R→L."""
    return np.ascontiguousarray(slice_xy[::-1, ::-1].T)  # (Y, X)


def image_to_axial_slice(img: np.ndarray) -> np.ndarray:
    """Inverse of `axial_slice_to_image`: image (H, W) → RAS+ axial slice (X=W, Y=H)."""
    return np.ascontiguousarray(img.T[::-1, ::-1])  # (X, Y)


def reorient_to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip the first three axes to the closest canonical RAS+ order (as nibabel does).

    Args:
        array: (A0, A1, A2, ...) voxel array in the order described by `affine`.
        affine: (4, 4) voxel → RAS world.
    Returns:
        array (X, Y, Z, ...) and its (4, 4) affine; same voxels, same world positions.
    """
    from nibabel import orientations as nio  # nibabel only for 3D grids, not the 2D views

    ornt = nio.io_orientation(affine)  # (3, 2): target axis and flip for each input axis
    out = nio.apply_orientation(array, ornt)  # (X, Y, Z, ...)
    return out, affine @ nio.inv_ornt_aff(ornt, array.shape[:3])


def reorient_like(array: np.ndarray, ras_affine: np.ndarray, target_affine: np.ndarray,
                  name: str = "") -> np.ndarray:
    """Put a RAS+ array (X, Y, Z) back into the voxel order of a file whose affine is `target_affine`.

    Raises DatasetError if the two grids are not the same up to axis permutations and flips.
    """
    from nibabel import orientations as nio  # nibabel only for 3D grids, not the 2D views

    back = nio.ornt_transform(nio.io_orientation(ras_affine), nio.io_orientation(target_affine))
    out = nio.apply_orientation(array, back)
    new_affine = ras_affine @ nio.inv_ornt_aff(back, array.shape[:3])
    if not np.allclose(new_affine, target_affine, rtol=1e-4, atol=1e-3):
        raise DatasetError(f"{name}: the array's grid differs from the reference grid "
                           f"(affine\n{new_affine}\nvs\n{target_affine}); fix: predict on the grid "
                           "returned by read_nifti / read_dicom_series for this file")
    return out


def resample_nearest(array: np.ndarray, affine: np.ndarray, shape: tuple, target_affine: np.ndarray):
    """Nearest-neighbour resampling of a label volume onto another grid through world coordinates.

    Args:
        array: (A0, A1, A2) labels; affine: its (4, 4) voxel → world.
        shape: target (X, Y, Z); target_affine: (4, 4).
    Returns:
        (X, Y, Z) array of `array.dtype`; voxels outside the source are 0.
    """
    from scipy import ndimage  # slow to import; only a mask on another grid needs it

    m = np.linalg.inv(affine) @ target_affine  # target voxel → source voxel
    src = array.astype(np.uint8) if array.dtype == bool else array
    out = ndimage.affine_transform(src, m[:3, :3], offset=m[:3, 3], output_shape=tuple(shape),
                                   order=0, mode="constant", cval=0)
    return out.astype(array.dtype)


def spread_indices(n_total: int, n_pick: int) -> list[int]:
    """`n_pick` of range(n_total) at the centres of equal bins (deterministic, spread evenly).

    All indices when n_pick >= n_total; none when n_pick <= 0. Used to sample tumour-free slices.
    """
    if n_pick >= n_total:
        return list(range(n_total))
    if n_pick <= 0:
        return []
    return sorted({int((j + 0.5) * n_total / n_pick) for j in range(n_pick)})


# ---------------------------------------------------------------- NIfTI
def read_nifti(path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI as (array (X, Y, Z), affine (4, 4)) in RAS+ (`nib.as_closest_canonical`).

    The on-disk dtype is kept (int16 HU stays int16; float if scl_slope is set), in native byte order.
    """
    import nibabel as nib  # slow to import; only NIfTI files need it

    path = Path(path)
    try:
        img = nib.as_closest_canonical(nib.squeeze_image(nib.load(str(path))))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel, gzip, zlib and EOF errors all mean a bad file
        raise DatasetError(f"{path}: cannot read NIfTI ({type(e).__name__}: {e}); fix: re-extract "
                           "or re-download this file") from e
    if data.ndim != 3:
        raise DatasetError(f"{path}: expected a 3D volume, got shape {data.shape}; fix: pass one "
                           "3D image (split 4D series first)")
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))  # torch/PIL want native byte order
    return data, np.asarray(img.affine, dtype=np.float64)


def read_nifti_pair(image_path, mask_path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read an image and its mask, both reoriented to RAS+, and check they share one grid.

    Returns:
        image (X, Y, Z) on-disk dtype, mask (X, Y, Z) bool (`> 0.5`), affine (4, 4).
    """
    image, affine = read_nifti(image_path)
    mask, mask_affine = read_nifti(mask_path)
    if image.shape != mask.shape or not np.allclose(affine, mask_affine, rtol=1e-4, atol=1e-3):
        raise DatasetError(
            f"{image_path} and {mask_path}: image and mask grids differ after reorientation "
            f"(shapes {image.shape} vs {mask.shape}, affines\n{affine}\nvs\n{mask_affine}); fix: "
            "use the mask that was drawn on this image, or resample it onto the image grid")
    return image, mask > 0.5, affine


def write_nifti_like(array: np.ndarray, affine: np.ndarray, path, like=None) -> Path:
    """Write a RAS+ array (X, Y, Z) as NIfTI.

    Args:
        array: (X, Y, Z) on the grid returned by read_nifti / read_dicom_series; bool → uint8.
        affine: its (4, 4) RAS+ affine.
        path: output file (.nii or .nii.gz).
        like: optional NIfTI the array was predicted from. The array is then put back into that
            file's on-disk voxel order and written with its affine, so it overlays the input
            voxel-for-voxel in any tool (SimpleITK, nnU-Net evaluation, viewers).
    """
    import nibabel as nib  # slow to import; only NIfTI files need it

    data = array.astype(np.uint8) if array.dtype == bool else array
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if like is not None:
        ref = nib.squeeze_image(nib.load(str(like)))
        data = reorient_like(data, affine, ref.affine, name=str(like))
        out = nib.Nifti1Image(data, ref.affine)
        out.set_qform(ref.affine, code=int(ref.header["qform_code"]) or 1)
        out.set_sform(ref.affine, code=int(ref.header["sform_code"]) or 1)
    else:
        out = nib.Nifti1Image(data, affine)
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
    nib.save(out, str(path))
    return path
