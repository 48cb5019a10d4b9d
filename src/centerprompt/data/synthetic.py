"""Synthetic multi-center HECKTOR-like PET/CT: one head-and-neck phantom seen by each center.

Real HECKTOR data cannot be shipped, so tests, examples and the leave-one-center-out
experiment run on this generator. A case is one patient drawn from its own seed
(anatomy, primary tumour GTVp, 0-4 lymph nodes GTVn) defined in a continuous patient
frame in mm (x lateral, y anterior, z superior, z = 0 at the tonsils), then acquired
by a center (:mod:`centerprompt.data.profiles`): CT and PET sampled on their own grids,
blurred, noised and calibrated; the label drawn on the CT grid in the center's
contouring style. Output follows the HECKTOR 2022 layout
(``imagesTr/<ID>__CT.nii.gz``, ``imagesTr/<ID>__PT.nii.gz``, ``labelsTr/<ID>.nii.gz``).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import math
import multiprocessing
import os
import zlib
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from centerprompt.data.labels import GTVN, GTVP, LABELS
from centerprompt.data.profiles import DEFAULT_PROFILES, CenterProfile
from centerprompt.files import atomic_path, bars

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0"
_PET_FINE_MM = 3.0  # PET activity is averaged over sub-voxels no coarser than this (partial volume)
_PET_STEP = 2.0**-10  # PET stored on a 1/1024 SUV grid, like a 16-bit DICOM store; keeps files small
_HU_MIN, _HU_MAX = -1024, 3071
_NO = 4.0  # shape level meaning "outside"; inside is level < 1

Vec = tuple[float, float, float]


@dataclass(frozen=True)
class Ellipsoid:
    """Axis-aligned ellipsoid, optionally cut below ``z_min`` (skull base)."""

    center: Vec
    axes: Vec
    z_min: float = -math.inf

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.center), np.asarray(self.axes)

    def level(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        (cx, cy, cz), (ax, ay, az) = self.center, self.axes
        q = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2
        return np.where(z < self.z_min, _NO, q) if self.z_min > -math.inf else q


@dataclass(frozen=True)
class Tube:
    """Elliptic cross-section whose centre and semi-axes are piecewise linear in z.

    Body outline, airway, spine and vessels; with ``wall`` a shell and with
    ``front_only`` its anterior half (mandible, laryngeal cartilage).
    """

    z: tuple[float, ...]
    xc: tuple[float, ...]
    yc: tuple[float, ...]
    ax: tuple[float, ...]
    ay: tuple[float, ...]
    wall: float = 0.0
    front_only: bool = False

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        xc, yc, ax, ay = (np.asarray(v, float) for v in (self.xc, self.yc, self.ax, self.ay))
        lo = np.array([(xc - ax).min(), (yc - ay).min(), self.z[0]])
        hi = np.array([(xc + ax).max(), (yc + ay).max(), self.z[-1]])
        return (lo + hi) / 2, (hi - lo) / 2

    def level(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        # Profiles tabulated every 0.25 mm and looked up: np.interp per voxel was the hot spot.
        steps = np.arange(self.z[0], self.z[-1] + 0.25, 0.25)
        idx = np.clip(np.rint((z - self.z[0]) * 4), 0, len(steps) - 1).astype(np.intp)
        xc, yc, ax, ay = (np.interp(steps, self.z, v).astype(np.float32)[idx]
                          for v in (self.xc, self.yc, self.ax, self.ay))
        q = ((x - xc) / ax) ** 2 + ((y - yc) / ay) ** 2
        out = (z < self.z[0]) | (z > self.z[-1])
        if self.wall:
            out |= ((x - xc) / (ax - self.wall)) ** 2 + ((y - yc) / (ay - self.wall)) ** 2 < 1
        if self.front_only:
            out |= y < yc
        return np.where(out, _NO, q)


@dataclass(frozen=True, eq=False)
class Lesion:
    """Union of star-shaped lobes, radius ``r0 (1 + sum a cos(w.u + phi))`` in direction u.

    Smooth low-frequency waves make the irregular true shape; ``rough`` holds
    high-frequency waves of unit total amplitude that a center's contour adds.
    """

    lobes: tuple[tuple[np.ndarray, float, np.ndarray], ...]  # (centre (3,), r0 mm, waves (k, 5))
    rough: np.ndarray  # (k, 5)

    def box(self, pad: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        c0 = self.lobes[0][0]
        reach = max(np.linalg.norm(c - c0) + r0 * (1 + np.abs(w[:, 4]).sum()) for c, r0, w in self.lobes)
        return c0, np.full(3, reach + pad + 1.0)

    def level(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, margin: float = 0.0,
              roughness: float = 0.0) -> np.ndarray:
        q = None
        for c, r0, waves in self.lobes:
            d = (x - c[0], y - c[1], z - c[2])
            r = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2) + 1e-3
            u = (d[0] / r, d[1] / r, d[2] / r)
            radius = r0 * (1 + _waves(u, waves)) + margin
            if roughness:
                radius = radius + roughness * _waves(u, self.rough)
            lobe = (r / np.maximum(radius, 0.5)) ** 2
            q = lobe if q is None else np.minimum(q, lobe)
        return q


def _waves(u: tuple[np.ndarray, ...], w: np.ndarray) -> np.ndarray:
    return sum(a * np.cos(wx * u[0] + wy * u[1] + wz * u[2] + ph) for wx, wy, wz, ph, a in w)


@dataclass(frozen=True, eq=False)
class Tissue:
    """A shape with its CT number and FDG uptake; lesions add a core and a central peak."""

    name: str
    shape: Ellipsoid | Tube | Lesion
    hu: float
    suv: float
    hu_contrast: float = 0.0  # added on contrast-enhanced CT
    peak: float = 0.0  # uptake falls by this fraction from centre to rim
    core: float = 0.0  # normalised radius of a necrotic or cystic core
    hu_core: float = 0.0
    suv_core: float = 0.0


@dataclass(frozen=True, eq=False)
class Patient:
    """Anatomy painted in order (later tissues win), and the lesions the label is drawn from."""

    tissues: tuple[Tissue, ...]
    gtvp: Tissue
    nodes: tuple[Tissue, ...]


class _Draw:
    """Shape makers in a template patient frame, scaled to this patient and jittered per organ."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.s, self.sz = rng.uniform(0.9, 1.1), rng.uniform(0.92, 1.08)  # in-plane and craniocaudal size
        self.scale = np.array([self.s, self.s, self.sz])

    def u(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def ell(self, c: Vec, a: Vec, jitter: float = 2.0, z_min: float = -math.inf) -> Ellipsoid:
        return Ellipsoid(tuple(np.asarray(c) * self.scale + self.rng.normal(0, jitter, 3)),
                         tuple(np.asarray(a) * self.scale * self.rng.uniform(0.9, 1.1, 3)), z_min * self.sz)

    def tube(self, z: list, xc: list, yc: list, ax: list, ay: list, **kw: float) -> Tube:
        xy = (tuple(np.broadcast_to(np.asarray(v, float) * self.s, len(z))) for v in (xc, yc, ax, ay))
        return Tube(tuple(np.asarray(z, float) * self.sz), *xy, **kw)


def sample_patient(rng: np.random.Generator) -> Patient:
    """Draw one plausible head-and-neck patient; sizes, positions and uptakes vary per patient."""
    d = _Draw(rng)
    hu = {"fat": d.u(-115, -85), "muscle": d.u(35, 55), "bone": d.u(1050, 1300)}
    tissues = _outline(d, hu) + _head(d, hu) + _neck(d, hu) + _skeleton(d, hu)
    gtvp, side = _primary_tumour(d, hu["muscle"])
    nodes = _nodes(d, side, gtvp, hu["muscle"])
    reactive = []  # small normal nodes with mild uptake at levels I-II, never contoured
    for _ in range(rng.integers(0, 4)):
        center = np.array([d.u(28, 45) * rng.choice([-1, 1]), d.u(-10, 15), d.u(-40, 0)]) * d.scale
        reactive.append(_lesion_tissue(rng, "reactive node", center, d.u(2.5, 4.5), 0.1, 1, hu=hu["muscle"] - 5,
                                       suv=d.u(1.2, 2.2)))
    return Patient(tuple(tissues + reactive + nodes + [gtvp]), gtvp, tuple(nodes))


def _outline(d: _Draw, hu: dict[str, float]) -> list[Tissue]:
    """Skin outline (wide head, narrow neck, shoulders), subcutaneous fat, muscle, lung apices, clavicles."""
    z = [-200, -120, -95, -75, -50, -35, -15, 15, 45, 80, 110, 140, 160, 172]
    half_width = np.array([175, 175, 150, 70, 58, 60, 65, 68, 72, 74, 74, 66, 48, 15])
    half_depth = np.array([105, 105, 95, 68, 62, 72, 88, 92, 100, 98, 95, 85, 62, 20])
    yc = [-5, -5, -10, -10, -10, 0, 6, 8, 8, 0, -5, -8, -8, -8]
    fat_mm = d.u(3, 12)
    fat = np.where(np.asarray(z) > 50, min(fat_mm, 5.0), fat_mm) / d.s  # the scalp stays thin
    out = [Tissue("subcutaneous fat", d.tube(z, 0, yc, half_width, half_depth), hu["fat"], d.u(0.25, 0.4)),
           Tissue("muscle", d.tube(z, 0, yc, half_width - fat, half_depth - fat), hu["muscle"], d.u(0.6, 1.0),
                  hu_contrast=8)]
    for side in (-1, 1):
        out += [Tissue("neck fat plane", d.tube([-95, -20], side * 40, -25, 9, 12), hu["fat"], 0.3),
                Tissue("parapharyngeal fat", d.ell((side * 24, -4, 15), (5, 8, 12)), hu["fat"], 0.3),
                Tissue("lung apex", d.ell((side * 55, -10, -215), (45, 55, 100)), -850, 0.4),
                Tissue("clavicle", d.ell((side * 62, 25, -100), (55, 8, 8)), hu["bone"] - 200, 0.5)]
    return out


def _head(d: _Draw, hu: dict[str, float]) -> list[Tissue]:
    """Skull, brain (FDG avid), orbits, sinuses, chewing muscles, salivary glands, Waldeyer's ring."""
    air = {"hu": -1000.0, "suv": 0.0}
    out = [Tissue("skull", d.ell((0, -5, 108), (70, 90, 62), z_min=55), hu["bone"], 0.6),
           Tissue("brain", d.ell((0, -5, 110), (63, 83, 55), jitter=1.0, z_min=58), d.u(30, 40), d.u(7, 10),
                  hu_contrast=5),
           Tissue("ventricles", d.ell((0, -5, 118), (12, 25, 12)), d.u(5, 12), 0.5),
           Tissue("nasal cavity", d.ell((0, 52, 38), (9, 30, 20)), **air),
           Tissue("tongue", d.ell((0, 30, 2), (24, 30, 16)), d.u(50, 65), d.u(1.0, 2.2), hu_contrast=10),
           Tissue("adenoid", d.ell((0, -10, 34), (12, 6, 8)), hu["muscle"] + 5, d.u(1.5, 3.5), hu_contrast=15),
           Tissue("lingual tonsil", d.ell((0, 6, -10), (14, 6, 7)), hu["muscle"] + 5, d.u(1.5, 4.0), hu_contrast=15)]
    for side in (-1, 1):
        out += [Tissue("orbital fat", d.ell((side * 32, 66, 65), (17, 18, 16)), hu["fat"] + 20, 0.3),
                Tissue("eye", d.ell((side * 32, 70, 65), (12, 12, 12), jitter=1.0), d.u(10, 20), 0.6),
                Tissue("maxillary sinus", d.ell((side * 27, 45, 38), (13, 17, 15)), **air),
                Tissue("masseter", d.ell((side * 55, 5, 10), (9, 20, 25)), hu["muscle"], d.u(0.8, 2.5)),
                Tissue("pterygoid", d.ell((side * 33, -2, 20), (8, 14, 14)), hu["muscle"], d.u(0.8, 2.0)),
                Tissue("parotid", d.ell((side * 52, -8, 25), (11, 18, 20)), d.u(-20, 15), d.u(1.2, 2.5),
                       hu_contrast=20),
                Tissue("palatine tonsil", d.ell((side * 17, -4, 6), (7, 9, 11)), hu["muscle"] + 5, d.u(2.0, 5.0),
                       hu_contrast=20)]
    return out


def _neck(d: _Draw, hu: dict[str, float]) -> list[Tissue]:
    """Submandibular glands, thyroid, carotid arteries and jugular veins."""
    out = []
    for side in (-1, 1):
        thyroiditis = d.u(0, 1) < 0.1  # diffuse thyroid uptake, a known benign hot spot
        jugular_mm = d.u(4, 7)  # often asymmetric
        out += [Tissue("submandibular gland", d.ell((side * 33, 22, -30), (10, 12, 9)), d.u(40, 55), d.u(1.4, 3.0),
                       hu_contrast=25),
                Tissue("thyroid", d.ell((side * 17, 12, -75), (8, 9, 20)), d.u(90, 120),
                       d.u(3.0, 5.0) if thyroiditis else d.u(0.9, 2.0), hu_contrast=40),
                Tissue("carotid", d.tube([-200, -60, 30], [side * 25, side * 22, side * 30], [0, 2, 5], 3.5, 3.5),
                       40, d.u(1.5, 2.0), hu_contrast=d.u(180, 260)),
                Tissue("jugular", d.tube([-200, -60, 30], [side * 33, side * 32, side * 38], [-2, -4, -8],
                                         jugular_mm, jugular_mm), 40, d.u(1.4, 1.9), hu_contrast=d.u(120, 180))]
    return out


def _skeleton(d: _Draw, hu: dict[str, float]) -> list[Tissue]:
    """Cervical spine with discs, mandible with teeth, laryngeal cartilage, and the airway last."""
    z = [-200, -120, -40, 20, 32]  # the spine curves back into the thorax
    y = np.array([-45, -35, -25, -22, -22])
    marrow = d.u(600, 800)
    out = [Tissue("posterior vertebral arch", d.tube(z, 0, y - 15, 14, 12), hu["bone"] - 200, 0.8),
           Tissue("spinal canal", d.tube(z, 0, y - 15, 7, 7), 20, 0.4),
           Tissue("spinous process", d.tube(z, 0, y - 30, 3, 10), hu["bone"] - 200, 0.8),
           Tissue("vertebral bodies", d.tube(z, 0, y, 10, 8), marrow, d.u(1.2, 2.0))]
    for k in range(1, 10):  # intervertebral discs every ~18 mm below C2
        zc = 20 - 18 * k
        out.append(Tissue("disc", d.tube([zc - 2, zc + 2], 0, float(np.interp(zc, z, y)), 10, 8), 90, 0.8))
    out += [Tissue("mandible", d.tube([-30, -2], 0, 5, 47, 62, wall=9, front_only=True), hu["bone"], 0.5),
            Tissue("teeth", d.tube([-2, 8], 0, 5, 45, 60, wall=8, front_only=True), d.u(1600, 2200), 0.4),
            Tissue("thyroid cartilage", d.tube([-70, -42], 0, 4, 18, 16, wall=2, front_only=True), d.u(150, 400), 0.5)]
    for side in (-1, 1):
        ramus = d.tube([-25, 40], [side * 46, side * 48], [5, -8], 4, 12)
        out.append(Tissue("mandibular ramus", ramus, hu["bone"], 0.5))
    lumen = d.u(0.8, 1.2)  # collapsed to wide-open airway
    out.append(Tissue("airway", d.tube([-200, -120, -70, -50, -35, 0, 22, 44], 0, [-15, 0, 8, 4, -5, -5, -2, 5],
                                       np.array([8, 8, 8, 9, 11, 13, 12, 8]) * lumen,
                                       np.array([7, 7, 8, 7, 6, 6, 7, 5]) * lumen), -1000.0, 0.0))
    return out


def _lesion_tissue(rng: np.random.Generator, name: str, center: np.ndarray, r0: float, deform: float, lobes: int,
                   **values: float) -> Tissue:
    """A lesion: ``lobes`` star-shaped lobes, deformed by ``deform`` (sum of wave amplitudes)."""

    def waves(n: int, freq: tuple[float, float], total: float) -> np.ndarray:
        dirs = rng.normal(size=(n, 3))
        w = dirs / np.linalg.norm(dirs, axis=1, keepdims=True) * rng.uniform(*freq, (n, 1))
        amp = rng.uniform(0.2, 1.0, n)
        return np.column_stack([w, rng.uniform(0, 2 * np.pi, n), amp / amp.sum() * total])

    parts = [(np.asarray(center, float), r0, waves(4, (1.5, 3.5), deform))]
    for _ in range(lobes - 1):
        d = rng.normal(size=3)
        parts.append((parts[0][0] + d / np.linalg.norm(d) * r0 * rng.uniform(0.4, 0.7), r0 * rng.uniform(0.4, 0.7),
                      waves(3, (1.5, 3.5), deform)))
    return Tissue(name, Lesion(tuple(parts), waves(6, (8.0, 14.0), 1.0)), **values)


def _primary_tumour(d: _Draw, hu_muscle: float) -> tuple[Tissue, int]:
    """GTVp at an oropharyngeal site (tonsil, base of tongue) or, less often, the larynx/hypopharynx.

    Returns the tissue and its side (-1, 1, or 0 for midline), which the nodes follow.
    """
    rng, scale = d.rng, d.scale
    side = int(rng.choice([-1, 1]))
    site = rng.choice(3, p=[0.5, 0.35, 0.15])
    lo, hi = [((13, -10, -3), (21, -2, 13)), ((-8, 7, -14), (8, 16, -2)), ((5, -1, -56), (15, 7, -40))][site]
    center = rng.uniform(lo, hi) * np.array([side, 1, 1]) * scale
    r0 = float(np.clip(np.exp(rng.normal(np.log(15), 0.3)), 6, 25))  # equivalent diameter 12-50 mm
    necrotic = r0 > 14 and rng.uniform() < 0.45
    tissue = _lesion_tissue(rng, "GTVp", center, r0, rng.uniform(0.1, 0.25), int(rng.integers(1, 4)),
                            hu=hu_muscle + rng.uniform(3, 10), hu_contrast=rng.uniform(15, 35),
                            suv=float(np.clip(np.exp(rng.normal(np.log(10), 0.35)), 5, 20)), peak=0.35,
                            core=rng.uniform(0.35, 0.6) if necrotic else 0.0, hu_core=rng.uniform(10, 25),
                            suv_core=rng.uniform(0.8, 2.0))
    return tissue, (side if site != 1 or abs(center[0]) > 4 else 0)


def _nodes(d: _Draw, side: int, gtvp: Tissue, hu_muscle: float) -> list[Tissue]:
    """0-4 involved nodes at levels II-IV, mostly ipsilateral; a quarter with low FDG uptake."""
    rng, scale = d.rng, d.scale
    count = int(rng.choice(5, p=[0.2, 0.35, 0.25, 0.12, 0.08]))
    levels = {2: ((32, -12, -28), (44, 8, -5)), 3: ((30, -8, -50), (40, 10, -30)), 4: ((30, -5, -78), (42, 12, -55))}
    placed: list[tuple[np.ndarray, float]] = [(gtvp.shape.lobes[0][0], gtvp.shape.lobes[0][1])]
    nodes = []
    for _ in range(count):
        r0 = float(np.clip(np.exp(rng.normal(np.log(7), 0.35)), 4, 15))  # diameter 8-30 mm
        for _attempt in range(20):
            lo, hi = levels[int(rng.choice([2, 3, 4], p=[0.55, 0.3, 0.15]))]
            lateral = side if side and rng.uniform() < 0.8 else int(rng.choice([-1, 1]))
            center = rng.uniform(lo, hi) * np.array([lateral, 1, 1]) * scale
            if all(np.linalg.norm(center - c) > r0 + r + 2 for c, r in placed):
                break
        placed.append((center, r0))
        low = rng.uniform() < 0.25
        cystic = r0 >= 7 and rng.uniform() < 0.2
        nodes.append(_lesion_tissue(rng, "GTVn", center, r0, rng.uniform(0.05, 0.15), 1,
                                    hu=hu_muscle - 5 + rng.uniform(0, 8), hu_contrast=rng.uniform(10, 25),
                                    suv=rng.uniform(1.5, 3.5) if low else rng.uniform(3.5, 15), peak=0.3,
                                    core=rng.uniform(0.5, 0.7) if cystic else 0.0, hu_core=rng.uniform(15, 25),
                                    suv_core=rng.uniform(0.8, 1.5)))
    return nodes


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


def _case_descrip(seed: int, profile: CenterProfile, index: int) -> str:
    """Tag stored in every file of a case, so a rerun can skip cases made with the same inputs."""
    blob = json.dumps([GENERATOR_VERSION, seed, index, profile.to_dict()], sort_keys=True)
    return f"centerprompt-synth {hashlib.sha1(blob.encode()).hexdigest()[:16]}"


def _write_atomic(path: Path, data: bytes, compress: bool = False) -> None:
    """Write atomically, so an interrupted run never leaves a partial file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if compress:  # level 3: as small as 6 on noisy CT, 3x faster; mtime=0 and no name: same bytes
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=3, mtime=0) as gz:
                gz.write(data)
        else:
            f.write(data)


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, descrip: str) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = descrip.encode()
    _write_atomic(path, img.to_bytes(), compress=True)


def _is_done(paths: list[Path], descrip: str) -> bool:
    import nibabel as nib

    try:
        return all(p.is_file() and nib.load(p).header["descrip"].item().decode() == descrip for p in paths)
    except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError):  # unreadable: regenerate it
        return False


PARALLEL_FROM = 12  # cases per worker process below which generate_dataset writes in its own process


def _write_case(job: tuple[Path, CenterProfile, int, int]) -> bool:
    """Write one case of :func:`generate_dataset` unless it is already there; True if it was."""
    out, profile, seed, index = job
    case_id = f"{profile.name}-{index:03d}"
    paths = [out / "imagesTr" / f"{case_id}__CT.nii.gz", out / "imagesTr" / f"{case_id}__PT.nii.gz",
             out / "labelsTr" / f"{case_id}.nii.gz"]  # fmt: skip
    descrip = _case_descrip(seed, profile, index)
    if _is_done(paths, descrip):
        return True
    case = make_case(profile, seed, index)
    _write_nifti(paths[0], case.ct, case.ct_affine, descrip)
    _write_nifti(paths[1], case.pet, case.pet_affine, descrip)
    _write_nifti(paths[2], case.label, case.ct_affine, descrip)  # last: its tag marks the case complete
    return False


def generate_dataset(out_dir: str | Path, centers: list[str] | None = None, cases_per_center: int = 16, seed: int = 0,
                     profiles: dict[str, CenterProfile] | None = None, progress: bool = True,
                     workers: int | None = None, cases: Mapping[str, int] | None = None) -> Path:
    """Write a synthetic multi-center dataset in the HECKTOR 2022 layout and return its folder.

    Args:
        out_dir: folder to write (created); cases already there from the same seed and
            profile are kept, so an interrupted run resumes.
        centers: center names to generate, default all of ``profiles``.
        cases_per_center: patients per center, default 16.
        cases: patients of named centers, where they differ from ``cases_per_center`` (a new center
            with enough test cases for intervals beside small pretraining centers).
        seed: dataset seed, default 0; case ``i`` of center ``C`` depends only on (seed, C, i).
        profiles: center profiles, default :data:`DEFAULT_PROFILES`.
        progress: show a progress bar.
        workers: processes writing cases; default one per CPU core when there are at least 12 cases
            for each (1: in this process).
    """
    from tqdm.auto import tqdm

    profiles = dict(DEFAULT_PROFILES if profiles is None else profiles)
    centers = list(profiles) if centers is None else list(centers)
    unknown = [c for c in centers if c not in profiles]
    if unknown or not centers:
        raise ValueError(f"centers must be among {', '.join(profiles)}, got {', '.join(unknown) or 'none'}")
    counts = {c: cases_per_center for c in centers} | dict(cases or {})
    for name, n in counts.items():
        if name not in centers:
            raise ValueError(f"cases: {name} is not one of the centers generated ({', '.join(centers)})")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 999:
            raise ValueError(f"cases_per_center must be in 1..999, got {n!r} for {name}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    renamed = [f"{key} (named {profiles[key].name})" for key in centers if profiles[key].name != key]
    if renamed:
        raise ValueError(f"profiles must be keyed by their own name: {', '.join(renamed)}")
    out = Path(out_dir)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    jobs = [(out, profiles[c], seed, i) for c in centers for i in range(1, counts[c] + 1)]
    case_ids = [f"{p.name}-{i:03d}" for _, p, _, i in jobs]
    if workers is None:  # a started process costs about a second (imports): worth it from a dozen cases
        workers = min(os.cpu_count() or 1, len(jobs) // PARALLEL_FROM) or 1
    # Cases are independent (each depends on (seed, center, index) only) and generation is one core's
    # numpy and gzip work, so a process per core divides the time (2 cores, 112 cases: 52 s -> 33 s).
    # spawn, not fork: the caller may hold torch's OpenMP threads, which a forked child can deadlock on.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=spawn) if workers > 1 else contextlib.nullcontext() as pool:
        done = pool.map(_write_case, jobs, chunksize=4) if pool is not None else map(_write_case, jobs)
        skipped = sum(tqdm(done, total=len(jobs), desc="synth", unit="case", disable=bars(progress)))
    stale = sorted({p.name.split("__")[0].removesuffix(".nii.gz") for p in out.glob("*Tr/*.nii.gz")} - set(case_ids))
    if stale:
        logger.warning("%s holds %d cases from an earlier run that are not part of this dataset (e.g. %s)",
                       out, len(stale), stale[0])
    used = {c: profiles[c].to_dict() for c in centers}
    _write_atomic(out / "profiles.json", (json.dumps(used, indent=2) + "\n").encode())
    meta = {"name": "centerprompt synthetic HECKTOR-like PET/CT", "generator_version": GENERATOR_VERSION,
            "seed": seed, "cases_per_center": cases_per_center, "centers": centers,
            "num_cases": counts, "num_training": len(case_ids),
            "labels": LABELS, "modalities": {"CT": "HU", "PT": "SUV times the center's suv_calibration"},
            "file_ending": ".nii.gz", "cases": case_ids}
    _write_atomic(out / "dataset.json", (json.dumps(meta, indent=2) + "\n").encode())
    logger.info("synthetic dataset in %s: %d cases (%d kept from an earlier run)", out, len(case_ids), skipped)
    return out
