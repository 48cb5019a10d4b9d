"""HECKTOR label values: what each voxel value of a label map means, in one place.

Labels are on the CT grid: 0 background, 1 primary tumour (GTVp), 2 lymph nodes (GTVn). Metrics
and results JSON key the two scored classes by lowercase name ("gtvp", "gtvn").
"""

from __future__ import annotations

BACKGROUND, GTVP, GTVN = 0, 1, 2

#: Label value by display name (also the ``labels`` entry of a synthetic ``dataset.json``).
LABELS: dict[str, int] = {"background": BACKGROUND, "GTVp": GTVP, "GTVn": GTVN}
#: Display name by label value.
LABEL_NAMES: dict[int, str] = {value: name for name, value in LABELS.items()}
#: Every valid label value, ascending: (0, 1, 2).
LABEL_VALUES: tuple[int, ...] = tuple(sorted(LABEL_NAMES))
#: Label values that are scored (background is not), by metric key.
CLASSES: dict[str, int] = {"gtvp": GTVP, "gtvn": GTVN}
NUM_LABELS = len(LABEL_VALUES)  # output channels of a segmentation network
