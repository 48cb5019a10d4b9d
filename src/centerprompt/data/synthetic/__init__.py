"""Synthetic multi-center HECKTOR-like PET/CT: one head-and-neck phantom seen by each center.

Real HECKTOR data cannot be shipped, so tests, examples and the leave-one-center-out
experiment run on this generator. A case is one patient drawn from its own seed, then acquired
by a center: CT and PET sampled on their own grids, blurred, noised and calibrated, the label
drawn on the CT grid in the center's contouring style. Output follows the HECKTOR 2022 layout
(``imagesTr/<ID>__CT.nii.gz``, ``imagesTr/<ID>__PT.nii.gz``, ``labelsTr/<ID>.nii.gz``).

- :mod:`~centerprompt.data.synthetic.profiles`: :class:`CenterProfile`, the seven default
  centers and :func:`load_profiles` for new ones;
- :mod:`~centerprompt.data.synthetic.anatomy`: shapes, tissues and :func:`sample_patient`;
- :mod:`~centerprompt.data.synthetic.scanner`: a center's acquisition, :func:`make_case`;
- :mod:`~centerprompt.data.synthetic.writer`: NIfTI files and :func:`generate_dataset`.

The names below are imported on first use, so importing the profiles alone stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_LAZY = {
    "CT_KERNELS": "centerprompt.data.synthetic.profiles",
    "CenterProfile": "centerprompt.data.synthetic.profiles",
    "DEFAULT_PROFILES": "centerprompt.data.synthetic.profiles",
    "load_profiles": "centerprompt.data.synthetic.profiles",
    "profiles_markdown_table": "centerprompt.data.synthetic.profiles",
    "Patient": "centerprompt.data.synthetic.anatomy",
    "Tissue": "centerprompt.data.synthetic.anatomy",
    "sample_patient": "centerprompt.data.synthetic.anatomy",
    "SyntheticCase": "centerprompt.data.synthetic.scanner",
    "case_rng": "centerprompt.data.synthetic.scanner",
    "make_case": "centerprompt.data.synthetic.scanner",
    "GENERATOR_VERSION": "centerprompt.data.synthetic.writer",
    "generate_dataset": "centerprompt.data.synthetic.writer",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from centerprompt.data.synthetic.anatomy import Patient, Tissue, sample_patient
    from centerprompt.data.synthetic.profiles import (
        CT_KERNELS,
        DEFAULT_PROFILES,
        CenterProfile,
        load_profiles,
        profiles_markdown_table,
    )
    from centerprompt.data.synthetic.scanner import SyntheticCase, case_rng, make_case
    from centerprompt.data.synthetic.writer import GENERATOR_VERSION, generate_dataset


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'centerprompt.data.synthetic' has no attribute {name!r}")
