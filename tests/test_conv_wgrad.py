"""The forward-form weight gradient (mptrain/conv_wgrad.py) against PyTorch's own convolution gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mptrain.config import validate
from mptrain.errors import ConfigError
from mptrain.library.models import conv_wgrad

from .conftest import compose_config, read_jsonl, train

# (kernel, stride, padding, bias, channels_last, input H, W): same and non-same padding, strides that
# do and do not divide the map, a non-square kernel, 1x1 projections
SHAPES = [
    (3, 1, 1, False, False, 5, 6),
    (3, 1, 1, True, True, 4, 4),
    (5, 1, 1, True, False, 6, 6),
    (3, 2, 1, True, True, 5, 6),
    (1, 2, 0, False, False, 4, 4),
    (1, 2, 0, True, True, 5, 7),
    (5, 3, 2, True, False, 9, 8),
    ((3, 1), (2, 1), (1, 0), False, True, 6, 5),
    (3, 2, 0, True, False, 8, 8),
]


def grads(conv: nn.Module, x: torch.Tensor, grad_out: torch.Tensor | None = None, autocast: torch.dtype | None = None):
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        y = conv(x)
    if grad_out is None:
        grad_out = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y.backward(grad_out.to(y.dtype))
    out = {"y": y.detach(), "x": x.grad, "weight": conv.weight.grad}
    if conv.bias is not None:
        out["bias"] = conv.bias.grad
    return out, grad_out


def make(kernel, stride, padding, bias, channels_last, h, w, dtype=torch.float32):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, kernel, stride=stride, padding=padding, bias=bias).to(dtype)
    x = torch.randn(3, 6, h, w, dtype=dtype)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return conv, x


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_form_gives_the_exact_gradients_in_fp32(shape):
    conv, x = make(*shape)
    ours = copy.deepcopy(conv)
    assert conv_wgrad.apply(ours, "forward") == 1
    exact, grad_out = grads(copy.deepcopy(conv).double(), x.double())  # float64 reference
    native, _ = grads(conv, x, grad_out)
    got, _ = grads(ours, x, grad_out)
    assert got["y"].grad_fn is None and torch.equal(got["y"], native["y"])  # the forward is PyTorch's own
    for key in exact:
        scale = exact[key].abs().max().item()
        err = (got[key].double() - exact[key]).abs().max().item()
        native_err = (native[key].double() - exact[key]).abs().max().item()
        assert got[key].shape == native[key].shape and got[key].dtype == native[key].dtype
        assert err <= 1e-5 * scale, (key, err, scale)  # fp32 rounding, nothing more
        assert err <= 4 * native_err + 1e-6 * scale, (key, err, native_err)


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[6]])
def test_forward_form_under_bf16_autocast_is_as_accurate_as_native(shape):
    conv, x = make(*shape)
    ours = copy.deepcopy(conv)
    conv_wgrad.apply(ours, "forward")
    exact, grad_out = grads(copy.deepcopy(conv).double(), x.double())
    native, _ = grads(conv, x, grad_out, autocast=torch.bfloat16)
    got, _ = grads(ours, x, grad_out, autocast=torch.bfloat16)
    assert got["y"].dtype == torch.bfloat16 and torch.equal(got["y"], native["y"])
    assert ours.weight.grad.dtype == torch.float32  # the gradient reaches the fp32 parameter
    for key in ("x", "weight"):
        scale = exact[key].abs().max().item()
        err = (got[key].double() - exact[key]).abs().max().item()
        native_err = (native[key].double() - exact[key]).abs().max().item()
        assert err <= 2e-2 * scale and err <= 2 * native_err + 1e-3 * scale, (key, err, native_err, scale)


def path(conv: nn.Module, x: torch.Tensor, autocast: torch.dtype | None = None) -> str:
    """Which backward the convolution recorded."""
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        return type(conv(x).grad_fn).__name__


def test_auto_takes_the_forward_form_only_on_small_maps():
    def conv(stride=1, **kw):
        m = nn.Conv2d(4, 4, 3, stride=stride, padding=1, bias=False, **kw)
        conv_wgrad.apply(m, "auto")
        return m

    small, large = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 8, 8)
    forward, native = "_ConvWgradByForwardBackward", "ConvolutionBackward0"
    # bf16: up to 16 output pixels; fp32: up to 4 (mptrain.library.models.conv_wgrad.AUTO_MAX_PIXELS)
    assert conv_wgrad.AUTO_MAX_PIXELS == {torch.bfloat16: 16, torch.float32: 4}
    assert path(conv(), small, torch.bfloat16) == forward
    assert path(conv(), large, torch.bfloat16) == native
    assert path(conv(stride=2), large, torch.bfloat16) == forward  # 8x8 -> 4x4 output
    assert path(conv(), small) == native  # fp32, 16 pixels
    assert path(conv(), torch.randn(2, 4, 2, 2)) == forward  # fp32, 4 pixels
    assert path(conv(), small, torch.float16) == native  # fp16 on CPU: not measured, left alone
    with torch.no_grad():
        assert conv()(small).grad_fn is None  # evaluation: the plain convolution
    for kw in ({"dilation": 2}, {"groups": 2}, {"padding_mode": "reflect"}):
        m = nn.Conv2d(4, 4, 3, padding=2 if "dilation" in kw else 1, bias=False, **kw)
        conv_wgrad.apply(m, "forward")
        assert path(m, small, torch.bfloat16) == native, kw
    same = nn.Conv2d(4, 4, 3, padding="same")
    conv_wgrad.apply(same, "forward")
    assert path(same, small) == native


def test_apply_switches_only_plain_conv2d_and_keeps_the_state_dict():
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(nn.Conv2d(1, 2, 3), MyConv(2, 2, 3), nn.Sequential(nn.Conv2d(2, 2, 1)), nn.Linear(2, 2))
    before = copy.deepcopy(model.state_dict())
    assert conv_wgrad.apply(copy.deepcopy(model), "native") == 0
    assert conv_wgrad.apply(model, "auto") == 2
    assert type(model[1]) is MyConv and isinstance(model[0], nn.Conv2d) and type(model[0]) is conv_wgrad.Conv2d
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="choose one of auto, native, forward"):
        conv_wgrad.apply(model, "fast")


def test_training_with_the_forward_form_follows_native_training(tmp_path):
    # fp32: the two runs differ only by rounding inside the weight gradients
    common = ["model=cnn", "model.width=8", "precision=fp32", "trainer.max_steps=6", "trainer.log_every=1",
              "trainer.batch_size=32", "checkpoint.enabled=false", "diagnostics=off"]
    losses = {}
    for mode in ("native", "forward"):
        summary, run_dir = train(tmp_path / mode, [*common, f"trainer.conv_wgrad={mode}"])
        assert summary["status"] == "completed"
        losses[mode] = [row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row]
    assert len(losses["native"]) == 6
    assert losses["native"][0] == losses["forward"][0]  # the first forward pass is the same computation
    assert losses["forward"] == pytest.approx(losses["native"], rel=1e-4)
    assert losses["forward"] != losses["native"]  # ... and the forward form did run (its rounding differs)


def test_bad_conv_wgrad_is_refused():
    with pytest.raises(ConfigError, match=r"trainer\.conv_wgrad=.fast. is invalid: choose auto, native or forward"):
        validate(compose_config(["trainer.conv_wgrad=fast"]))
