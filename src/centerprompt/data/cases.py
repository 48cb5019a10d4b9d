"""A case, whatever layout it was read from (HECKTOR, nnU-Net raw, a MONAI datalist), and the
error every reader raises for bad input data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """Bad input data; the message names the case and the file so the user can fix it."""


@dataclass(frozen=True)
class Case:
    """One patient: CT and PET images, and the label if the case is annotated."""

    case_id: str
    center: str
    ct: Path
    pet: Path
    label: Path | None = None

    @property
    def labelled(self) -> bool:
        return self.label is not None
