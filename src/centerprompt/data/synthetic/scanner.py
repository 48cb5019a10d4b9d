"""A center's acquisition of a synthetic patient: scan grids, pose, CT, PET and its contour.

:func:`make_case` draws the patient (:mod:`~centerprompt.data.synthetic.anatomy`), then the
pose and table, the PET shifts, and the CT and PET noise from the case's own stream, in this
order; the same seed gives the same arrays only while that order holds.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter

from centerprompt.data.labels import GTVN, GTVP
from centerprompt.data.synthetic.anatomy import Patient, Tissue, sample_patient
from centerprompt.data.synthetic.profiles import CenterProfile

_PET_FINE_MM = 3.0  # PET activity is averaged over sub-voxels no coarser than this (partial volume)
_PET_STEP = 2.0**-10  # PET stored on a 1/1024 SUV grid, like a 16-bit DICOM store; keeps files small
_HU_MIN, _HU_MAX = -1024, 3071


@dataclass(frozen=True, eq=False)
class _Grid:
    """A voxel grid and the map from voxel indices to the patient frame (after pose and shift)."""

    shape: tuple[int, int, int]
    affine: np.ndarray  # voxel -> world mm (RAS)
    to_patient: np.ndarray  # voxel -> patient frame mm

    def slices(self, center: np.ndarray, half: np.ndarray) -> tuple[slice, slice, slice] | None:
        corners = center + half * np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)])
        vox = (np.linalg.inv(self.to_patient) @ np.c_[corners, np.ones(8)].T)[:3]
        lo = np.maximum(np.floor(vox.min(1)).astype(int), 0)
        hi = np.minimum(np.ceil(vox.max(1)).astype(int) + 1, self.shape)
        return None if np.any(lo >= hi) else tuple(slice(a, b) for a, b in zip(lo, hi))

    def coords(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        i, j, k = (np.arange(s.start, s.stop, dtype=np.float32) for s in sl)
        m = self.to_patient.astype(np.float32)
        return tuple(m[r, 0] * i[:, None, None] + m[r, 1] * j[None, :, None] + m[r, 2] * k[None, None, :] + m[r, 3]
                     for r in range(3))


def _scan_grid(spacing_xy: float, slice_mm: float, fov_xy: float, z_range: tuple[float, float],
               center_xy: np.ndarray, z_start: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of a scan with a square field of view, voxels in DICOM order as NIfTI from DICOM is.

    i runs to the patient's left and j to posterior, so the RAS affine has -spacing on x and y.
    """
    n = int(round(fov_xy / spacing_xy))
    shape = (n, n, int(round((z_range[1] - z_range[0]) / slice_mm)))
    affine = np.diag([-spacing_xy, -spacing_xy, slice_mm, 1.0])
    affine[:3, 3] = [center_xy[0] + (n - 1) / 2 * spacing_xy, center_xy[1] + (n - 1) / 2 * spacing_xy,
                     z_start + slice_mm / 2]
    return shape, affine


def _pose(rng: np.random.Generator, profile: CenterProfile) -> np.ndarray:
    """Patient frame -> world: head flexion, roll and yaw, and the patient's place on the table."""
    spread = profile.tilt_std_deg
    pitch, roll, yaw = np.radians(rng.normal([profile.tilt_mean_deg, 0, 0], [spread, spread / 2, spread / 2]))
    cx, sx, cy, sy, cz, sz = np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll), np.cos(yaw), np.sin(yaw)
    rot = (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
           @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]))
    pose = np.eye(4)
    pose[:3, :3] = rot
    pose[:3, 3] = rng.normal(0, profile.position_std_mm, 3)
    return pose


def _paint(grid: _Grid, tissues: tuple[Tissue, ...], ct: bool, contrast: bool = False) -> np.ndarray:
    """CT numbers (``ct``) or true SUV of the tissues at the voxel centres; later tissues win."""
    out = np.full(grid.shape, -1000.0 if ct else 0.0, np.float32)
    for tissue in tissues:
        sl = grid.slices(*tissue.shape.box())
        if sl is None:
            continue
        q = tissue.shape.level(*grid.coords(sl))
        if ct:
            value = tissue.hu + (tissue.hu_contrast if contrast else 0.0)
            core_value = tissue.hu_core
        else:
            value = tissue.suv * (1 - tissue.peak * q) if tissue.peak else tissue.suv
            core_value = tissue.suv_core
        if tissue.core:
            value = np.where(q < tissue.core**2, core_value, value)
        np.copyto(out[sl], value, where=q < 1, casting="unsafe")
    return out


def _label(grid: _Grid, patient: Patient, profile: CenterProfile) -> np.ndarray:
    """The center's contour: true lesions with its margin and roughness; faint nodes left out."""
    label = np.zeros(grid.shape, np.uint8)
    pad = max(profile.label_margin_mm, 0.0) + profile.label_roughness_mm
    contoured = [n for n in patient.nodes if n.suv * profile.suv_calibration >= profile.node_min_suv]
    for tissue, value in [(n, GTVN) for n in contoured] + [(patient.gtvp, GTVP)]:
        sl = grid.slices(*tissue.shape.box(pad))
        if sl is not None:
            q = tissue.shape.level(*grid.coords(sl), margin=profile.label_margin_mm,
                                   roughness=profile.label_roughness_mm)
            label[sl][q < 1] = value
    return label


def _ct_kernel(image: np.ndarray, profile: CenterProfile) -> np.ndarray:
    """Slice profile (FWHM = slice thickness) and the in-plane reconstruction kernel."""
    image = gaussian_filter(image, (0, 0, 1 / 2.355))
    if profile.ct_kernel == "smooth":
        sigma = profile.ct_kernel_strength / 2.355 / profile.ct_spacing_xy_mm
        return gaussian_filter(image, (sigma, sigma, 0))
    sigma = 1.2 / profile.ct_spacing_xy_mm  # unsharp mask over ~3 mm, like edge-enhancing kernels
    blurred = gaussian_filter(image, (sigma, sigma, 0))
    return image + profile.ct_kernel_strength * (image - blurred)


def _acquire_ct(hu: np.ndarray, profile: CenterProfile, rng: np.random.Generator) -> np.ndarray:
    """Kernel, noise of the stated standard deviation (same kernel texture), HU offset, int16 storage."""
    noise = _ct_kernel(rng.standard_normal(hu.shape, dtype=np.float32), profile)
    noise *= profile.ct_noise_hu / noise[::2, ::2, ::2].std()
    ct = _ct_kernel(hu, profile) + noise + profile.ct_hu_offset
    n = hu.shape[0]
    r2 = (np.arange(n)[:, None] - (n - 1) / 2) ** 2 + (np.arange(hu.shape[1])[None, :] - (hu.shape[1] - 1) / 2) ** 2
    ct[r2 > (n / 2) ** 2] = _HU_MIN  # outside the reconstruction circle
    return np.round(np.clip(ct, _HU_MIN, _HU_MAX)).astype(np.int16)


def _acquire_pet(fine: np.ndarray, sub: np.ndarray, profile: CenterProfile, rng: np.random.Generator) -> np.ndarray:
    """Voxel integration, Gaussian PSF, calibration and Poisson-like correlated noise."""
    n = np.array(fine.shape) // sub
    pet = fine.reshape(n[0], sub[0], n[1], sub[1], n[2], sub[2]).mean(axis=(1, 3, 5))
    sigma = profile.pet_fwhm_mm / 2.355 / np.array([profile.pet_spacing_xy_mm] * 2 + [profile.pet_slice_mm])
    pet = gaussian_filter(pet, sigma) * profile.suv_calibration
    noise = gaussian_filter(rng.standard_normal(pet.shape, dtype=np.float32), sigma / 2)  # OSEM noise is blobby
    pet += profile.pet_noise * np.sqrt(np.maximum(pet, 0)) * noise / noise.std()
    return (np.round(np.maximum(pet, 0) / _PET_STEP) * _PET_STEP).astype(np.float32)


@dataclass(frozen=True, eq=False)
class SyntheticCase:
    """One acquired case: CT (HU, int16), PET (SUV x calibration, float32), label on the CT grid."""

    ct: np.ndarray
    ct_affine: np.ndarray
    pet: np.ndarray
    pet_affine: np.ndarray
    label: np.ndarray
    patient: Patient = field(repr=False)


def case_rng(seed: int, center: str, index: int) -> np.random.Generator:
    """Each case has its own stream, so adding cases or centers leaves the others unchanged."""
    return np.random.default_rng([seed, zlib.crc32(center.encode()), index])


def make_case(profile: CenterProfile, seed: int, index: int) -> SyntheticCase:
    """Draw patient ``index`` of a center and acquire it with the center's profile."""
    rng = case_rng(seed, profile.name, index)
    patient = sample_patient(rng)
    pose = _pose(rng, profile)
    table = np.array([rng.uniform(-20, 20), rng.uniform(-40, 40), rng.uniform(-500, 100)])  # scanner coordinates
    world = pose.copy()
    world[:3, 3] += table
    aim = table[:2] + [0.0, -5.0]  # the technologist centres the field of view on the neck

    ct_shape, ct_affine = _scan_grid(profile.ct_spacing_xy_mm, profile.ct_slice_mm, profile.ct_fov_xy_mm,
                                     profile.ct_z_range_mm, aim, table[2] + profile.ct_z_range_mm[0])
    ct_grid = _Grid(ct_shape, ct_affine, np.linalg.inv(world) @ ct_affine)

    # PET: its own grid, not aligned with the CT, and the patient shifted a little since the CT.
    pet_shape, pet_affine = _scan_grid(profile.pet_spacing_xy_mm, profile.pet_slice_mm, profile.pet_fov_xy_mm,
                                       profile.pet_z_range_mm, aim + rng.normal(0, 3, 2),
                                       table[2] + profile.pet_z_range_mm[0] + rng.uniform(0, profile.pet_slice_mm))
    direction = rng.normal(size=3)
    misreg = np.eye(4)
    misreg[:3, 3] = direction / np.linalg.norm(direction) * rng.uniform(0, profile.misregistration_mm)
    pet_spacing = np.array([profile.pet_spacing_xy_mm, profile.pet_spacing_xy_mm, profile.pet_slice_mm])
    sub = np.maximum(np.ceil(pet_spacing / _PET_FINE_MM), 1).astype(int)
    to_fine = np.diag([*(1 / sub), 1.0])
    to_fine[:3, 3] = (1 / sub - 1) / 2  # sub-voxel centres inside each PET voxel
    pet_fine = _Grid(tuple(np.array(pet_shape) * sub), pet_affine @ to_fine,
                     np.linalg.inv(misreg @ world) @ pet_affine @ to_fine)

    ct = _acquire_ct(_paint(ct_grid, patient.tissues, ct=True, contrast=profile.ct_contrast), profile, rng)
    pet = _acquire_pet(_paint(pet_fine, patient.tissues, ct=False), sub, profile, rng)
    return SyntheticCase(ct, ct_affine, pet, pet_affine, _label(ct_grid, patient, profile), patient)
