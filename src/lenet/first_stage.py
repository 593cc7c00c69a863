"""The tutorial LeNet's first stage (5x5 convolution to 6 maps, 2x2 max-pooling) for CPU
training steps, through lenet's compiled kernel when it is built.

PyTorch runs the convolution and the pooling as two general kernels, and at these shapes (one
input map, six output maps, 28x28 images) they and their backward passes took about half of a
training step on 2 cores: 8.3 of 17 ms for a batch of 256 (torch.profiler). The kernel
(`_first_stage.c`, built at install by setup.py) makes each image's six 24x24 maps in a small
local array and pools them at once: 1.1 ms forward and 1.1 ms backward for the same batch, on
one thread. It gives PyTorch's pooled maps to float32 rounding (the same first-largest pixel
of each window) and the same weight and bias gradients to float32 rounding
(tests/test_first_stage.py). It is optional: where it was not built, or for inputs it does
not cover (not float32 28x28 on the CPU, bf16 autocast, an input that needs a gradient),
`LeNet.training_forward` runs PyTorch's kernels.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from lenet import _first_stage as _kernel  # type: ignore[attr-defined]
except ImportError:  # not built here (no C compiler at install, or an unusual platform)
    _kernel = None

# Off: PyTorch's kernels everywhere (benchmarks/train_step.py compares the two; tests too).
enabled = True
MAPS, SIDE, POOLED = 6, 28, 12


def available() -> bool:
    """Whether the compiled kernel is built and switched on."""
    return enabled and _kernel is not None


def variant() -> str | None:
    """Which build of the kernel this CPU runs ("avx2" or "plain"), None when not built."""
    return None if _kernel is None else _kernel.variant


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch before 2.4: one function per device
        return torch.is_autocast_cpu_enabled()


def covers(x: torch.Tensor, conv: torch.nn.Conv2d) -> bool:
    """Whether the kernel can run this convolution (and the 2x2 pooling after it) on ``x``."""
    weight, bias = conv.weight, conv.bias
    return (
        available()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and tuple(x.shape[1:]) == (1, SIDE, SIDE)
        and not x.requires_grad
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and tuple(weight.shape) == (MAPS, 1, 5, 5)
        and bias is not None
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and not _autocast_on()
    )


class _FirstStage(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        count = x.shape[0]
        x = x.detach().contiguous()  # one map: channels-last is already this layout
        taps = weight.detach().reshape(MAPS, 25).contiguous()
        bias = bias.detach().contiguous()
        pooled = torch.empty((count, POOLED, POOLED, MAPS))
        winner = torch.empty((count, POOLED, POOLED, MAPS), dtype=torch.uint8)
        _kernel.forward(
            x.data_ptr(), taps.data_ptr(), bias.data_ptr(), pooled.data_ptr(),
            winner.data_ptr(), count,
        )  # fmt: skip
        ctx.save_for_backward(x, winner)
        # (N, 6, 12, 12) in channels-last memory, which the second convolution takes as is.
        return pooled.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, torch.Tensor]:
        x, winner = ctx.saved_tensors
        grad = grad.permute(0, 2, 3, 1).contiguous()  # no copy when channels-last already
        grad_weight = torch.empty((MAPS, 1, 5, 5))
        grad_bias = torch.empty(MAPS)
        _kernel.backward(
            x.data_ptr(), grad.data_ptr(), winner.data_ptr(), grad_weight.data_ptr(),
            grad_bias.data_ptr(), x.shape[0],
        )  # fmt: skip
        return None, grad_weight, grad_bias


def conv_pool(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """``max_pool2d(conv(x), 2, 2)`` through the kernel; call only where ``covers`` says so."""
    return _FirstStage.apply(x, conv.weight, conv.bias)
