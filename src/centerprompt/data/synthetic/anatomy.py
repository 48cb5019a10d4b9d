"""Synthetic head-and-neck anatomy: shapes, tissues, and one random patient per case.

A patient lives in a continuous frame in mm (x lateral, y anterior, z superior, z = 0 at the
tonsils): normal anatomy, a primary tumour (GTVp) and 0-4 lymph nodes (GTVn).
:func:`sample_patient` draws all of it from the case's generator in a fixed order, which the
generated files depend on: reordering draws here changes every dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

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
