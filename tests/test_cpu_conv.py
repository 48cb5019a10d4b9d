"""3D convolutions routed through oneDNN compute what PyTorch's own kernel computes, gradients included."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from centerprompt.evaluate import sliding_window_predict
from centerprompt.models.cpu_conv import onednn_conv3d

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


def _ops(fn) -> set[str]:
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("kwargs", [{}, {"stride": 2, "padding": 1}, {"padding": (1, 0, 2), "dilation": 2}])
def test_batch_one_convolution_takes_onednn_and_matches_pytorch(kwargs: dict) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(8, 8, 3, **kwargs)
    x = torch.rand(1, 8, 20, 20, 20, requires_grad=True)  # N*C*D*H = 3200 <= 20480: ATen picks its own kernel
    assert "aten::mkldnn_convolution" not in _ops(lambda: conv(x))
    reference = conv(x)
    (grad_x, grad_w) = torch.autograd.grad(reference.square().sum(), (x, conv.weight))
    with onednn_conv3d():
        assert "aten::mkldnn_convolution" in _ops(lambda: conv(x))
        routed = conv(x)
        (routed_x, routed_w) = torch.autograd.grad(routed.square().sum(), (x, conv.weight))
    torch.testing.assert_close(routed, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed_x, grad_x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(routed_w, grad_w, rtol=1e-4, atol=1e-4)
    assert "aten::mkldnn_convolution" not in _ops(lambda: conv(x))  # only inside the block


def test_other_calls_are_left_to_pytorch() -> None:
    conv = torch.nn.Conv3d(4, 4, 3, padding="same")  # string padding: not oneDNN's argument form
    x64 = torch.rand(1, 4, 8, 8, 8, dtype=torch.float64)
    with onednn_conv3d():
        assert "aten::mkldnn_convolution" not in _ops(lambda: conv(torch.rand(1, 4, 8, 8, 8)))
        assert "aten::mkldnn_convolution" not in _ops(lambda: conv.double()(x64))


def test_sliding_window_prediction_is_unchanged_by_the_routing() -> None:
    torch.manual_seed(0)
    model = tiny_model().eval()
    image = torch.rand(1, 2, 40, 36, 32)
    with torch.no_grad():
        from monai.inferers import sliding_window_inference

        plain = torch.softmax(sliding_window_inference(image, (32, 32, 32), 4, model, overlap=0.25, mode="constant"), 1)
    routed = sliding_window_predict(model, image, (32, 32, 32), 4)
    torch.testing.assert_close(routed, plain, rtol=1e-4, atol=1e-5)
