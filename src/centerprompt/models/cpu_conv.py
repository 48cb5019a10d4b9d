"""3D convolutions through oneDNN on the CPU, whatever the batch size.

PyTorch (2.13, ATen's ``use_mkldnn`` heuristic) sends a float32 ``conv3d`` to its reference
``slow_conv3d`` kernel when the batch is 1, the kernel is 3 wide or less and N*C*D*H is at most
20480: exactly the full-resolution layers of a small UNETR decoder at inference, where a sliding
window is one volume. Measured on a 2-core AMD EPYC: an 8->8 channel 3^3 convolution over 48^3
takes 72 ms that way and 6-11 ms through oneDNN; the whole cpu-preset network's forward pass 318 ms
against 122 ms (benchmarks/RESULTS.md, "Where the demo's time goes"). :func:`onednn_conv3d` routes
those calls to ``torch.mkldnn_convolution``, which computes the same convolution (differences of
float rounding, ~1e-6) and keeps its gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_CONV3D: tuple[Callable[..., Any], ...] = (F.conv3d, torch.conv3d)
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _triple(value: Any) -> tuple[int, int, int] | None:
    if isinstance(value, int):
        return (value,) * 3
    if isinstance(value, (tuple, list)) and len(value) == 3 and all(isinstance(v, int) for v in value):
        return tuple(value)  # type: ignore[return-value]
    return None  # "same"/"valid" padding or an odd form: left to PyTorch


class _OneDNNConv3d(TorchFunctionMode):
    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _CONV3D:
            x, weight = args[0], args[1]
            given = {**dict(zip(_DEFAULTS, args[2:])), **kwargs}
            opts = {**_DEFAULTS, **given}
            stride, padding, dilation = (_triple(opts[k]) for k in ("stride", "padding", "dilation"))
            if (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 5 and weight.dtype == torch.float32
                    and None not in (stride, padding, dilation)):  # fmt: skip
                return torch.mkldnn_convolution(x, weight, opts["bias"], padding, stride, dilation, opts["groups"])
        return func(*args, **kwargs)


@contextmanager
def onednn_conv3d() -> Iterator[None]:
    """Within the block, float32 CPU ``conv3d`` calls run through oneDNN (see the module docstring);
    other devices, dtypes and calls are untouched. A no-op where PyTorch lacks oneDNN."""
    if not torch.backends.mkldnn.is_available():
        yield
        return
    with _OneDNNConv3d():
        yield
