"""Acquisition and contouring profiles of PET/CT centers, for the synthetic generator.

A :class:`CenterProfile` holds what differs between centers in a multi-center PET/CT
study: scanner grids and resolution, noise, calibration, CT contrast and reconstruction
kernel, field of view, patient setup, PET/CT misregistration and the contouring style
of the label. ``DEFAULT_PROFILES`` has one profile for each of the seven HECKTOR 2022
training centers. Their values are plausible for the scanner generations those
centers used, fixed once from physics and practice, not measured from the real data
and not tuned for any method. A user simulates a new center with :func:`load_profiles`.
Meaning, unit and allowed range of each parameter live in the field metadata below
(one place); ``docs/centers.md`` explains why each one varies between real centers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from centerprompt.files import read_text

CT_KERNELS = ("smooth", "sharp")
# A center name becomes the prefix of case ids (CHUM-001), so no '-' or '_'.
_NAME_RE = re.compile(r"^[A-Za-z0-9]{1,16}$")
# Refuse grids that would need more memory than a laptop has for one case.
_MAX_VOXELS = 40_000_000


def _param(lo: float, hi: float, unit: str, doc: str) -> Any:
    return field(metadata={"range": (lo, hi), "unit": unit, "doc": doc})


def _text(doc: str) -> Any:
    return field(metadata={"unit": "", "doc": doc})


@dataclass(frozen=True)
class CenterProfile:
    """How one center acquires, reconstructs and contours a head-and-neck PET/CT.

    All fields are required; ranges are validated on construction and a bad value
    raises ``ValueError`` naming the center and the field. z ranges are in mm along
    the patient's superior axis, relative to the oropharynx (tonsil level, z = 0).
    """

    name: str = _text("center name, prefix of the case ids")
    scanner: str = _text("scanner model the values are meant to resemble")
    ct_spacing_xy_mm: float = _param(0.3, 3.0, "mm", "CT in-plane voxel spacing")
    ct_slice_mm: float = _param(0.5, 6.0, "mm", "CT slice thickness (= slice spacing)")
    ct_fov_xy_mm: float = _param(120.0, 700.0, "mm", "CT in-plane field of view (square)")
    ct_z_range_mm: tuple[float, float] = _param(-250.0, 250.0, "mm", "CT scan range (inferior, superior)")
    ct_noise_hu: float = _param(0.0, 100.0, "HU", "CT noise standard deviation after the kernel")
    ct_kernel: str = _text("CT reconstruction kernel: smooth (Gaussian) or sharp (unsharp mask)")
    ct_kernel_strength: float = _param(0.0, 3.0, "mm / x", "smooth: blur FWHM in mm; sharp: unsharp-mask amount")
    ct_hu_offset: float = _param(-50.0, 50.0, "HU", "CT calibration offset added to every voxel")
    ct_contrast: bool = _text("contrast-enhanced CT (vessels, mucosa and tumour brighter)")
    pet_spacing_xy_mm: float = _param(1.5, 8.0, "mm", "PET in-plane voxel spacing")
    pet_slice_mm: float = _param(1.5, 8.0, "mm", "PET slice spacing")
    pet_fov_xy_mm: float = _param(120.0, 800.0, "mm", "PET in-plane extent kept (square)")
    pet_z_range_mm: tuple[float, float] = _param(-250.0, 250.0, "mm", "PET scan range (inferior, superior)")
    pet_fwhm_mm: float = _param(2.0, 12.0, "mm", "PET resolution: FWHM of the Gaussian PSF")
    pet_noise: float = _param(0.0, 1.0, "", "PET relative noise at SUV 1 (Poisson-like, grows as sqrt(SUV))")
    suv_calibration: float = _param(0.5, 2.0, "x", "factor on every PET value (cross-calibration error)")
    position_std_mm: float = _param(0.0, 30.0, "mm", "patient shift in the field of view (std per axis)")
    tilt_mean_deg: float = _param(-20.0, 20.0, "deg", "mean head flexion (+) / extension (-)")
    tilt_std_deg: float = _param(0.0, 10.0, "deg", "spread of head flexion; roll and yaw get half of it")
    misregistration_mm: float = _param(0.0, 10.0, "mm", "largest PET/CT misregistration (random direction)")
    label_margin_mm: float = _param(-5.0, 5.0, "mm", "contour margin: + dilates, - erodes the true lesion")
    label_roughness_mm: float = _param(0.0, 5.0, "mm", "amplitude of contour irregularity")
    node_min_suv: float = _param(0.0, 30.0, "SUV", "nodes with measured SUVmax below this are not contoured")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # JSON and YAML give lists for tuples
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            if "range" in f.metadata:
                self._check_range(f.name, value, f.metadata["range"], f.metadata["unit"])
                # Store floats, so 230 and 230.0 give the same profile, JSON and case tags.
                object.__setattr__(self, f.name, tuple(map(float, value)) if isinstance(value, tuple) else float(value))
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"CenterProfile name must be 1-16 letters or digits, got {self.name!r}")
        if not isinstance(self.scanner, str):
            raise ValueError(f"CenterProfile {self.name}: scanner must be a string")
        if self.ct_kernel not in CT_KERNELS:
            raise ValueError(
                f"CenterProfile {self.name}: ct_kernel must be one of {CT_KERNELS}, got {self.ct_kernel!r}")
        if not isinstance(self.ct_contrast, bool):
            raise ValueError(f"CenterProfile {self.name}: ct_contrast must be true or false")
        ct_voxels = (self.ct_fov_xy_mm / self.ct_spacing_xy_mm) ** 2 * _span(self.ct_z_range_mm) / self.ct_slice_mm
        if ct_voxels > _MAX_VOXELS:
            raise ValueError(f"CenterProfile {self.name}: CT grid of {ct_voxels:.3g} voxels is too large; "
                             "raise ct_spacing_xy_mm or ct_slice_mm or shrink the field of view")

    def _check_range(self, key: str, value: Any, bounds: tuple[float, float], unit: str) -> None:
        lo, hi = bounds
        items = value if isinstance(value, tuple) else (value,)
        if isinstance(value, tuple) and len(value) != 2:
            raise ValueError(f"CenterProfile {self.name}: {key} must be a pair (inferior, superior), got {value!r}")
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
                raise ValueError(f"CenterProfile {self.name}: {key} must be a finite number, got {item!r}")
            if not lo <= item <= hi:
                raise ValueError(f"CenterProfile {self.name}: {key} must be in [{lo:g}, {hi:g}] {unit}, got {item!r}")
        if isinstance(value, tuple) and _span(value) < 80.0:
            raise ValueError(
                f"CenterProfile {self.name}: {key} must be increasing and span at least 80 mm, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _span(z_range: tuple[float, float]) -> float:
    return z_range[1] - z_range[0]


DEFAULT_PROFILES: dict[str, CenterProfile] = {
    p.name: p
    for p in (
        CenterProfile(name="CHUM", scanner="GE Discovery STE (non-TOF)", ct_spacing_xy_mm=1.8, ct_slice_mm=3.75,
                ct_fov_xy_mm=230, ct_z_range_mm=(-110, 115), ct_noise_hu=12, ct_kernel="smooth",
                ct_kernel_strength=1.0, ct_hu_offset=0, ct_contrast=False, pet_spacing_xy_mm=3.9,
                pet_slice_mm=3.27, pet_fov_xy_mm=280, pet_z_range_mm=(-125, 130), pet_fwhm_mm=6.5,
                pet_noise=0.15, suv_calibration=1.0, position_std_mm=4, tilt_mean_deg=0, tilt_std_deg=2,
                misregistration_mm=1.0, label_margin_mm=0.0, label_roughness_mm=0.5, node_min_suv=2.5),
        CenterProfile(name="CHUP", scanner="Siemens Biograph mCT 40 (TOF + PSF)", ct_spacing_xy_mm=1.6,
                ct_slice_mm=2.0, ct_fov_xy_mm=210, ct_z_range_mm=(-90, 130), ct_noise_hu=8, ct_kernel="sharp",
                ct_kernel_strength=0.5, ct_hu_offset=-8, ct_contrast=False, pet_spacing_xy_mm=4.07,
                pet_slice_mm=2.03, pet_fov_xy_mm=260, pet_z_range_mm=(-105, 150), pet_fwhm_mm=4.5,
                pet_noise=0.10, suv_calibration=1.08, position_std_mm=3, tilt_mean_deg=-4, tilt_std_deg=2,
                misregistration_mm=0.5, label_margin_mm=-1.0, label_roughness_mm=0.3, node_min_suv=3.0),
        CenterProfile(name="CHUS", scanner="Philips GEMINI GXL 16 (non-TOF)", ct_spacing_xy_mm=1.75,
                ct_slice_mm=3.0, ct_fov_xy_mm=240, ct_z_range_mm=(-115, 100), ct_noise_hu=15,
                ct_kernel="smooth", ct_kernel_strength=1.5, ct_hu_offset=5, ct_contrast=False,
                pet_spacing_xy_mm=4.0, pet_slice_mm=4.0, pet_fov_xy_mm=280, pet_z_range_mm=(-130, 120),
                pet_fwhm_mm=7.0, pet_noise=0.20, suv_calibration=0.92, position_std_mm=5, tilt_mean_deg=3,
                tilt_std_deg=3, misregistration_mm=1.5, label_margin_mm=1.0, label_roughness_mm=1.0,
                node_min_suv=2.0),
        CenterProfile(name="CHUV", scanner="GE Discovery D690 (TOF)", ct_spacing_xy_mm=1.7, ct_slice_mm=2.5,
                ct_fov_xy_mm=220, ct_z_range_mm=(-95, 135), ct_noise_hu=10, ct_kernel="smooth",
                ct_kernel_strength=0.8, ct_hu_offset=-3, ct_contrast=True, pet_spacing_xy_mm=2.73,
                pet_slice_mm=3.27, pet_fov_xy_mm=260, pet_z_range_mm=(-115, 155), pet_fwhm_mm=5.0,
                pet_noise=0.10, suv_calibration=0.96, position_std_mm=3, tilt_mean_deg=-2, tilt_std_deg=2,
                misregistration_mm=0.8, label_margin_mm=-0.5, label_roughness_mm=0.4, node_min_suv=2.5),
        CenterProfile(name="HGJ", scanner="GE Discovery ST (non-TOF)", ct_spacing_xy_mm=1.9, ct_slice_mm=3.75,
                ct_fov_xy_mm=230, ct_z_range_mm=(-110, 120), ct_noise_hu=14, ct_kernel="smooth",
                ct_kernel_strength=1.2, ct_hu_offset=10, ct_contrast=False, pet_spacing_xy_mm=5.47,
                pet_slice_mm=3.27, pet_fov_xy_mm=290, pet_z_range_mm=(-130, 140), pet_fwhm_mm=7.5,
                pet_noise=0.20, suv_calibration=1.12, position_std_mm=5, tilt_mean_deg=2, tilt_std_deg=3,
                misregistration_mm=1.5, label_margin_mm=0.5, label_roughness_mm=0.8, node_min_suv=2.0),
        CenterProfile(name="HMR", scanner="Philips GEMINI GXL 16, older low-dose protocol", ct_spacing_xy_mm=2.0,
                ct_slice_mm=5.0, ct_fov_xy_mm=250, ct_z_range_mm=(-125, 90), ct_noise_hu=22,
                ct_kernel="smooth", ct_kernel_strength=2.0, ct_hu_offset=-15, ct_contrast=False,
                pet_spacing_xy_mm=4.0, pet_slice_mm=4.0, pet_fov_xy_mm=300, pet_z_range_mm=(-140, 110),
                pet_fwhm_mm=8.0, pet_noise=0.28, suv_calibration=0.87, position_std_mm=7, tilt_mean_deg=6,
                tilt_std_deg=4, misregistration_mm=3.0, label_margin_mm=-1.5, label_roughness_mm=1.5,
                node_min_suv=3.5),
        CenterProfile(name="MDA", scanner="GE Discovery ST/STE/RX mix, contrast-enhanced CT", ct_spacing_xy_mm=1.6,
                ct_slice_mm=3.0, ct_fov_xy_mm=230, ct_z_range_mm=(-120, 110), ct_noise_hu=9, ct_kernel="sharp",
                ct_kernel_strength=0.8, ct_hu_offset=15, ct_contrast=True, pet_spacing_xy_mm=5.47,
                pet_slice_mm=3.27, pet_fov_xy_mm=290, pet_z_range_mm=(-140, 130), pet_fwhm_mm=6.0,
                pet_noise=0.14, suv_calibration=1.18, position_std_mm=6, tilt_mean_deg=-6, tilt_std_deg=4,
                misregistration_mm=2.0, label_margin_mm=2.5, label_roughness_mm=1.2, node_min_suv=0.0),
    )
}


def load_profiles(path: str | Path) -> dict[str, CenterProfile]:
    """Read center profiles from a JSON or YAML file (``{NAME: {field: value}}``).

    An entry may name ``base: <default center>`` and give only the fields that differ,
    which is the quick way to simulate a new center. Unknown or missing keys raise
    ``ValueError`` naming the file, the center and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"profile file {path} does not exist")
    text = read_text(path, "center profiles in JSON or YAML")
    import yaml

    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            raw = yaml.safe_load(text)
        else:
            raise ValueError(f"{path}: profile file must end in .json, .yaml or .yml")
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: not valid {path.suffix[1:].upper()} ({str(err).splitlines()[0]}).") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected a mapping from center name to its parameters")
    known = {f.name for f in dataclasses.fields(CenterProfile)} - {"name"}
    profiles = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: center {name!r} must map to a mapping of parameters")
        entry = dict(entry)
        base = entry.pop("base", None)
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(f"{path}: center {name!r} has unknown key {unknown[0]!r}; "
                             f"known keys: {', '.join(sorted(known))}")
        try:
            if base is not None:
                if base not in DEFAULT_PROFILES:
                    raise ValueError(f"base {base!r} is not a default center ({', '.join(DEFAULT_PROFILES)})")
                profile = dataclasses.replace(DEFAULT_PROFILES[base], name=str(name), **entry)
            else:
                missing = sorted(known - set(entry))
                if missing:
                    raise ValueError(f"missing {', '.join(missing)} (give them or set 'base' to a default center)")
                profile = CenterProfile(name=str(name), **entry)
        except ValueError as err:
            raise ValueError(f"{path}: center {name!r}: {err}") from None
        profiles[profile.name] = profile
    return profiles


def profiles_markdown_table(profiles: dict[str, CenterProfile]) -> str:
    """One row per parameter, one column per center, for docs and reports."""
    names = list(profiles)
    lines = ["| parameter | unit | " + " | ".join(names) + " |",
             "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for f in dataclasses.fields(CenterProfile):
        if f.name == "name":
            continue
        cells = [_format(getattr(profiles[n], f.name)) for n in names]
        lines.append(f"| `{f.name}` | {f.metadata['unit']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return "to".join(f" {v:g} " for v in value).strip()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
