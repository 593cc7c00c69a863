"""The tutorial LeNet's two stages (5x5 convolution, then 2x2 max-pooling) for CPU training
steps, through lenet's compiled kernels when they are built.

PyTorch runs each convolution and each pooling as general kernels, and at LeNet's shapes (1 or
6 input maps, 6 or 16 output maps, 28x28 and 12x12 images) they and their backward passes were
most of a training step on 2 cores: 15 of 18 ms for a batch of 256 (torch.profiler). The
kernels (`_stages.c`, built at install by setup.py) make each image's maps in a small local
array, pool them at once, and in the backward pass follow only each window's winner (a quarter
of the convolution's outputs have a gradient). On one thread, for the same batch: the first
stage 1.1 ms forward and 1.1 ms backward, the second 4.1 ms for both (PyTorch's: 7.4 ms on two
threads). They give PyTorch's pooled maps, with the same pixel winning each window (the first
largest in row order; NaN wins), and its gradients, all to float32 rounding
(tests/test_stages.py).

Each batch is cut into one share of images per PyTorch thread, run on PyTorch's own OpenMP
threads (``openmp`` names the runtime found): on one thread the kernels were 72% of a `lenet`
step at batch 256 on 2 cores, and sharing brought the step from 18.2 to 11.0 ms
(benchmarks/train_step.py, a Zen 1 machine). A thread count gives the same bits on every run;
another count adds the weight gradients' shares in another order.

lenet-relu's first stage puts BatchNorm and ReLU between the convolution and the pooling.
In training it runs as one kernel too (``normalised_first``): BatchNorm's batch statistics and
everything its backward pass needs are sums gathered while each image's maps are made and
pooled, so no 24x24 map is stored or given a gradient (a lenet-relu step at batch 256 went
from 24 to 15 ms, benchmarks/train_step.py on a Sapphire Rapids machine). After its second
convolution, and after both of lenet-plus's, BatchNorm, ReLU and pooling run compiled the
same way (``normalised``), and lenet-relu's second convolution gets a compiled input
gradient. Evaluated, on BatchNorm's running statistics, BatchNorm folds into the convolution
and lenet's own ``first`` and ``second`` kernels run lenet-relu (``folded``). Where none of
these covers a first convolution followed by BatchNorm, ``conv1`` writes its six maps
contiguous, as BatchNorm of six maps runs fastest. (A gamma of exactly 0 pools the largest
convolution output, where PyTorch pools a window's first pixel: every pixel is then beta,
and only gamma's gradient can differ.)

They are optional: where they were not built, or for inputs they do not cover (not float32 on
the CPU, other shapes, bf16 autocast), `LeNet.training_forward` runs PyTorch's kernels.
Evaluation (`lenet evaluate`, validation during training, the torch backend) runs them too,
through ``TrainingView``; export keeps `forward`, PyTorch's kernels in the tutorial's order.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:
    from lenet import _stages as _kernels  # type: ignore[attr-defined]
except ImportError:  # not built here (no C compiler at install, or an unusual platform)
    _kernels = None

# Off: PyTorch's kernels everywhere (benchmarks and tests compare the two).
enabled = True


def available() -> bool:
    """Whether the compiled kernels are built and switched on."""
    return enabled and _kernels is not None


def variant() -> str | None:
    """Which build of the kernels runs: "avx2" where the CPU has AVX2 and FMA, else "plain";
    None when they are not built."""
    return None if _kernels is None else _kernels.variant()


def use(build: str) -> str | None:
    """Run the "avx2" build (where the CPU has it) or the "plain" one from now on; returns the
    one in use. The fastest is chosen at import; tests check the other too."""
    return None if _kernels is None else _kernels.use(build)


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch before 2.4: one function per device
        return torch.is_autocast_cpu_enabled()


def _conv_covers(x: torch.Tensor, conv: nn.Conv2d, maps: int, side: int, out: int) -> bool:
    """Whether ``conv`` is a plain 5x5 convolution from ``maps`` to ``out`` maps and ``x`` is
    float32 (N, maps, side, side), all on the CPU, outside bf16 autocast."""
    weight = conv.weight
    return (
        available()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and tuple(x.shape[1:]) == (maps, side, side)
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and tuple(weight.shape) == (out, maps, 5, 5)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and not _autocast_on()
    )


def _plain_2x2(pool: nn.MaxPool2d) -> bool:
    return (
        pool.kernel_size in (2, (2, 2))
        and pool.stride in (2, (2, 2))
        and pool.padding in (0, (0, 0))
        and pool.dilation in (1, (1, 1))
        and not pool.ceil_mode
    )


def first_covers(x: torch.Tensor, conv: nn.Conv2d, pool: nn.MaxPool2d) -> bool:
    """Whether ``first`` can run: LeNet's first stage on float32 (N, 1, 28, 28) on the CPU,
    an input that needs no gradient (the kernel computes none for it)."""
    return (
        not x.requires_grad
        and conv.bias is not None
        and _plain_2x2(pool)
        and _conv_covers(x, conv, maps=1, side=28, out=6)
    )


def second_covers(x: torch.Tensor, conv: nn.Conv2d, pool: nn.MaxPool2d) -> bool:
    """Whether ``second`` can run: LeNet's second stage on float32 (N, 6, 12, 12) on the CPU."""
    return (
        conv.bias is not None
        and _plain_2x2(pool)
        and _conv_covers(x, conv, maps=6, side=12, out=16)
    )


def openmp() -> str | None:
    """The OpenMP runtime (PyTorch's own) whose threads share each batch among them, or None
    when one thread runs the kernels (not built, or no such runtime found)."""
    return None if _kernels is None else _kernels.openmp()


def _run(
    kernel: Any, first: torch.Tensor, *rest: torch.Tensor | int, scalars: tuple[float, ...] = ()
) -> None:
    """One kernel over a batch (``first``'s leading dimension), on as many threads as PyTorch
    uses; every tensor contiguous, on the CPU. Numbers among them (sizes) go as they are;
    ``scalars`` (BatchNorm's epsilon and update factor) follow the thread count."""
    given = (first, *rest)
    numbers = tuple(t if isinstance(t, int) else t.data_ptr() for t in given)
    kernel(numbers, first.shape[0], torch.get_num_threads(), *scalars)


class _First(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        count = x.shape[0]
        x = x.detach().contiguous()  # one map: channels-last is already this layout
        taps = weight.detach().reshape(6, 25).contiguous()
        bias = bias.detach().contiguous()
        pooled = torch.empty((count, 12, 12, 6))
        winner = torch.empty((count, 12, 12, 6), dtype=torch.uint8)
        _run(_kernels.forward1, x, taps, bias, pooled, winner)
        ctx.save_for_backward(x, winner)
        # (N, 6, 12, 12) in channels-last memory, which the second stage takes as it is.
        return pooled.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, torch.Tensor]:
        x, winner = ctx.saved_tensors
        grad = grad.permute(0, 2, 3, 1).contiguous()  # no copy when channels-last already
        grad_weight = torch.empty((6, 1, 5, 5))
        grad_bias = torch.empty(6)
        _run(_kernels.backward1, x, grad, winner, grad_weight, grad_bias)
        return None, grad_weight, grad_bias


class _Second(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        count = x.shape[0]
        pixels = x.detach().permute(0, 2, 3, 1).contiguous()  # (N, 12, 12, 6)
        taps = weight.detach().permute(2, 3, 1, 0).contiguous()  # (5, 5, 6, 16)
        bias = bias.detach().contiguous()
        pooled = torch.empty((count, 4, 4, 16))
        winner = torch.empty((count, 4, 4, 16), dtype=torch.uint8)
        _run(_kernels.forward2, pixels, taps, bias, pooled, winner)
        ctx.save_for_backward(pixels, winner, weight.detach())
        return pooled.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels, winner, weight = ctx.saved_tensors
        count = pixels.shape[0]
        grad = grad.permute(0, 2, 3, 1).contiguous()  # (N, 4, 4, 16)
        # (16, 5, 5, 8): each tap's six input maps padded to a vector of eight floats.
        taps8 = F.pad(weight.permute(0, 2, 3, 1), (0, 2)).contiguous()
        grad_x = torch.empty((count, 12, 12, 6))
        grad_weight = torch.empty((16, 5, 5, 6))
        grad_bias = torch.empty(16)
        _run(_kernels.backward2, pixels, grad, winner, taps8, grad_x, grad_weight, grad_bias)
        # Both in channels-last memory, the layout lenet trains the weights in.
        return grad_x.permute(0, 3, 1, 2), grad_weight.permute(0, 3, 1, 2), grad_bias


class _Conv1(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        count = x.shape[0]
        x = x.detach().contiguous()
        taps = weight.detach().reshape(6, 25).contiguous()
        shift = torch.zeros(6) if bias is None else bias.detach().contiguous()
        maps = torch.empty((count, 6, 24, 24))  # contiguous: what BatchNorm of 6 maps wants
        _run(_kernels.conv1_forward, x, taps, shift, maps)
        ctx.save_for_backward(x)
        ctx.has_bias = bias is not None
        return maps

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, torch.Tensor | None]:
        (x,) = ctx.saved_tensors
        grad = grad.contiguous()
        grad_weight = torch.empty((6, 1, 5, 5))
        grad_bias = torch.empty(6)
        _run(_kernels.conv1_backward, x, grad, grad_weight, grad_bias)
        return None, grad_weight, grad_bias if ctx.has_bias else None


class _NormalisedFirst(torch.autograd.Function):
    """relu(max_pool2d(batch_norm(conv(x)), 2, 2)) in training, batch statistics and all.

    The forward pass pools each map as soon as it is made (picking the window's largest or
    smallest convolution output by gamma's sign: BatchNorm scales a map by gamma / sigma), so
    no 24x24 map is stored; the batch's statistics come from sums gathered on the way, and so
    does what the backward pass needs besides the winners' gradients (_stages.c's bn1_backward
    says how). So no dense gradient is made either.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        gamma: torch.Tensor,
        beta: torch.Tensor,
        norm: nn.BatchNorm2d,
    ) -> torch.Tensor:
        count = x.shape[0]
        x = x.detach().contiguous()
        taps = weight.detach().reshape(6, 25).contiguous()
        gamma = gamma.detach().contiguous()
        picked = torch.empty((count, 12, 12, 6))
        winner = torch.empty((count, 12, 12, 6), dtype=torch.uint8)
        out = torch.empty((count, 12, 12, 6))
        sums = torch.empty(187, dtype=torch.float64)  # what bn1_forward_image lists
        centre = torch.empty(12, dtype=torch.float64)
        _run(
            _kernels.bn1_forward,
            x, taps, gamma, beta.detach().contiguous(), *_running_stats(norm),
            picked, winner, out, sums, centre,
            scalars=(norm.eps, _update_factor(norm)),
        )  # fmt: skip
        ctx.save_for_backward(x, picked, winner, out, sums, centre, gamma)
        # (N, 6, 12, 12) in channels-last memory, the layout the second convolution takes.
        return out.permute(0, 3, 1, 2)

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[None, torch.Tensor, torch.Tensor, torch.Tensor, None]:
        x, picked, winner, out, sums, centre, gamma = ctx.saved_tensors
        grad = grad.permute(0, 2, 3, 1).contiguous()  # no copy when channels-last already
        grad_weight, grad_gamma, grad_beta = (
            torch.empty((6, 1, 5, 5)),
            torch.empty(6),
            torch.empty(6),
        )
        _run(
            _kernels.bn1_backward,
            x, grad, out, picked, winner, sums, centre, gamma,
            grad_weight, grad_gamma, grad_beta,
        )  # fmt: skip
        return None, grad_weight, grad_gamma, grad_beta, None


def _running_stats(norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm's running mean and variance, which the kernels update in place."""
    for buffer in (norm.running_mean, norm.running_var):
        if not (buffer.dtype == torch.float32 and buffer.is_contiguous()):
            raise ValueError("BatchNorm's running statistics must be contiguous float32")
    return norm.running_mean, norm.running_var


def _update_factor(norm: nn.BatchNorm2d) -> float:
    """Counts a training batch, as BatchNorm's forward pass does, and gives the factor its
    running statistics move by: the momentum, or for a cumulative average 1 / batches."""
    norm.num_batches_tracked.add_(1)
    if norm.momentum is None:
        return 1.0 / float(norm.num_batches_tracked)
    return float(norm.momentum)


class _Normalised(torch.autograd.Function):
    """relu(max_pool2d(batch_norm(conv(x)), 2, 2)) in training, for a convolution PyTorch runs.

    The same idea as ``_NormalisedFirst`` after the convolution: the pooling picks by gamma's
    sign and the batch's sums come out of the same pass over the maps; backward, the
    convolution's output gets BatchNorm's whole gradient in one pass, and PyTorch's
    convolution backward takes it from there (for lenet-relu's second stage, the input
    gradient is compiled too). This replaces BatchNorm's, the ReLU's and the pooling's forward
    and backward passes, and the zero-filled gradient the pooling scatters into.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        gamma: torch.Tensor,
        beta: torch.Tensor,
        norm: nn.BatchNorm2d,
        conv: nn.Conv2d,
    ) -> torch.Tensor:
        made = F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        count, maps, height, width = made.shape
        made = made.permute(0, 2, 3, 1).contiguous()  # no copy when channels-last already
        gamma = gamma.detach().contiguous()
        pooled = (count, height // 2, width // 2, maps)
        picked, out = torch.empty(pooled), torch.empty(pooled)
        winner = torch.empty(pooled, dtype=torch.uint8)
        centre = torch.empty(2 * maps, dtype=torch.float64)
        _run(
            _kernels.bn_pool_forward,
            made, gamma, beta.detach().contiguous(), *_running_stats(norm),
            picked, winner, out, centre, height, width, maps,
            scalars=(norm.eps, _update_factor(norm)),
        )  # fmt: skip
        ctx.save_for_backward(x, weight, made, picked, winner, out, centre, gamma)
        ctx.conv = conv
        return out.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, weight, made, picked, winner, out, centre, gamma = ctx.saved_tensors
        conv = ctx.conv
        count, height, width, maps = made.shape
        grad = grad.permute(0, 2, 3, 1).contiguous()
        dmade = torch.empty_like(made)
        grad_gamma, grad_beta = torch.empty(maps), torch.empty(maps)
        _run(
            _kernels.bn_pool_backward,
            made, grad, out, picked, winner, centre, gamma, dmade, grad_gamma, grad_beta,
            height, width, maps,
        )  # fmt: skip
        # lenet-relu's second convolution: its input gradient compiled (1.4 ms at batch 256
        # on 2 threads, against 3.2-3.5 for PyTorch's channels-last one).
        own_input_grad = ctx.needs_input_grad[0] and _conv_covers(x, conv, maps=6, side=12, out=16)
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
            dmade.permute(0, 3, 1, 2),
            x,
            weight,
            None,
            conv.stride,
            conv.padding,
            conv.dilation,
            False,
            [0, 0],
            conv.groups,
            [ctx.needs_input_grad[0] and not own_input_grad, True, False],
        )
        if own_input_grad:
            taps = weight.detach().permute(1, 2, 3, 0).contiguous()  # (6, 5, 5, 16)
            grad_x = torch.empty((count, 12, 12, 6))
            _run(_kernels.input_grad2, dmade, taps, grad_x)
            grad_x = grad_x.permute(0, 3, 1, 2)  # channels-last, as x is
        return grad_x, grad_weight, grad_gamma, grad_beta, None, None


# bn_pool_forward's sums hold two doubles a map in a thread's partial sums (_stages.c).
_MOST_NORMALISED_MAPS = 64


def _batchnorm_fits(norm: nn.Module, conv: nn.Conv2d) -> bool:
    """A BatchNorm2d of the convolution's maps with running statistics, all float32 on the
    CPU (the kernels read and write them as such)."""
    return (
        type(norm) is nn.BatchNorm2d
        and norm.num_features == conv.out_channels
        and norm.track_running_stats
        and norm.running_mean is not None
        and norm.running_var is not None
        and all(
            t is None or (t.dtype == torch.float32 and t.device.type == "cpu")
            # (Its own tensors by name: norm.parameters() cost more than the stage, one image.)
            for t in (norm.running_mean, norm.running_var, norm.weight, norm.bias)
        )
    )


def _normalisation_covers(
    conv: nn.Conv2d, norm: nn.Module, relu: nn.Module, pool: nn.Module
) -> bool:
    """BatchNorm2d in training with running statistics, then ReLU, then 2x2 max-pooling."""
    return (
        norm.training  # first: evaluation asks this of every stage, every batch
        and _batchnorm_fits(norm, conv)
        and norm.affine
        and type(relu) is nn.ReLU
        and type(pool) is nn.MaxPool2d
        and _plain_2x2(pool)
    )


def normalised_covers(
    x: torch.Tensor, conv: nn.Conv2d, norm: nn.Module, relu: nn.Module, pool: nn.Module
) -> bool:
    """Whether ``normalised`` can run: a convolution without bias into 8, 16, ... 64 maps of
    even sides, then BatchNorm2d in training, ReLU and 2x2 max-pooling; float32 on the CPU."""
    weight = conv.weight
    if not (
        available()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and x.shape[0] > 0  # BatchNorm's statistics need pixels
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and conv.bias is None
        and isinstance(conv.padding, tuple)  # not "same" or "valid"
        and conv.padding_mode == "zeros"
        and conv.out_channels % 8 == 0
        and conv.out_channels <= _MOST_NORMALISED_MAPS
        and _normalisation_covers(conv, norm, relu, pool)
        and not _autocast_on()
    ):
        return False
    sides = [
        (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
        for size, pad, dilation, kernel, stride in zip(
            x.shape[2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride
        )
    ]
    return all(side > 0 and side % 2 == 0 for side in sides)


def normalised(x: torch.Tensor, conv: nn.Conv2d, norm: nn.BatchNorm2d) -> torch.Tensor:
    """``relu(pool(norm(conv(x))))`` in training, running statistics updated as ``norm``
    would; only where ``normalised_covers``. Fastest with ``x`` and the weight channels-last."""
    return _Normalised.apply(x, conv.weight, norm.weight, norm.bias, norm, conv)


def folded_covers(
    x: torch.Tensor, conv: nn.Conv2d, norm: nn.Module, relu: nn.Module, pool: nn.Module
) -> bool:
    """Whether ``folded`` can run: LeNet's first or second stage's shapes with BatchNorm on its
    running statistics (evaluation) between the convolution and the ReLU and pooling."""
    if not (
        not norm.training
        and _batchnorm_fits(norm, conv)
        and type(relu) is nn.ReLU
        and type(pool) is nn.MaxPool2d
        and _plain_2x2(pool)
    ):
        return False
    if x.dim() == 4 and x.shape[1] == 1:
        return not x.requires_grad and _conv_covers(x, conv, maps=1, side=28, out=6)
    return _conv_covers(x, conv, maps=6, side=12, out=16)


def folded(x: torch.Tensor, conv: nn.Conv2d, norm: nn.BatchNorm2d) -> torch.Tensor:
    """``relu(pool(norm(conv(x))))`` with BatchNorm on its running statistics, as lenet's
    ``first`` or ``second`` kernel: evaluated, BatchNorm is a scale and a shift per map, which
    fold into the convolution's weights and bias (so the pooling of the folded maps is that
    of the normalised ones, whatever the scale's sign). Differentiable, through the folding,
    to the convolution's and BatchNorm's parameters. Only where ``folded_covers``."""
    weight, bias = _folding(conv, norm)
    stage = _First if x.shape[1] == 1 else _Second
    # Without autograd, in place: a new tensor took 7 of 100 ms for 10,000 images (pages of
    # fresh memory). (With it, autograd forbids changing a custom function's output view.)
    return F.relu(stage.apply(x, weight, bias), inplace=not torch.is_grad_enabled())


# Evaluation folds the same weights for every batch: without autograd the last folding of each
# BatchNorm is kept with a copy of what it was made from, and made again once any of it differs.
# Compared by value: a tensor's version misses changes through `.data` and lenet's own kernels'
# writes to the running statistics. One picture at a time, the folding's eight small operations
# had cost more than comparing six small tensors (Recognizer.probabilities on one image: 541
# against 424 us with the folding kept, 30 alternated rounds).
_FOLDINGS: weakref.WeakKeyDictionary[nn.Module, tuple[Any, ...]] = weakref.WeakKeyDictionary()


def _same(kept: tuple[torch.Tensor | None, ...], now: tuple[torch.Tensor | None, ...]) -> bool:
    return all(
        a is None and b is None or a is not None and b is not None and torch.equal(a, b)
        for a, b in zip(kept, now)
    )


def _folding(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The convolution's weight and bias with ``norm`` (on its running statistics) folded in."""
    sources = (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var)
    recording = torch.is_grad_enabled()
    if not recording:
        kept = _FOLDINGS.get(norm)
        if kept is not None and kept[0] == norm.eps and _same(kept[1], sources):
            return kept[2], kept[3]
        # Folded from copies, so the kept folding is that of the values it is compared with
        # even if another thread changed the model meanwhile.
        sources = tuple(t.detach().clone() if t is not None else None for t in sources)
    conv_weight, conv_bias, gamma, beta, mean, var = sources
    scale = (var + norm.eps).rsqrt()
    if gamma is not None:
        scale = scale * gamma
    bias = -mean * scale
    if conv_bias is not None:
        bias = bias + conv_bias * scale
    if beta is not None:
        bias = bias + beta
    weight = conv_weight * scale.view(-1, 1, 1, 1)
    if not recording:
        _FOLDINGS[norm] = (norm.eps, sources, weight, bias)
    return weight, bias


def normalised_first_covers(
    x: torch.Tensor, conv: nn.Conv2d, norm: nn.Module, relu: nn.Module, pool: nn.Module
) -> bool:
    """Whether ``normalised_first`` can run: lenet-relu's first stage (a 5x5 convolution from
    one 28x28 map to 6 without bias, BatchNorm2d in training with running statistics, ReLU,
    2x2 max-pooling), float32 on the CPU, for an input that needs no gradient."""
    return (
        not x.requires_grad
        and x.shape[0] > 0  # BatchNorm's statistics need pixels
        and conv.bias is None
        and _normalisation_covers(conv, norm, relu, pool)
        and _conv_covers(x, conv, maps=1, side=28, out=6)
    )


def normalised_first(x: torch.Tensor, conv: nn.Conv2d, norm: nn.BatchNorm2d) -> torch.Tensor:
    """``relu(pool(norm(conv(x))))`` for lenet-relu's first stage in training, running
    statistics updated as ``norm`` would; only where ``normalised_first_covers``."""
    return _NormalisedFirst.apply(x, conv.weight, norm.weight, norm.bias, norm)


def conv1_covers(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether ``conv1`` can run: a 5x5 convolution from one 28x28 map to 6, with or without a
    bias, on float32 on the CPU, for an input that needs no gradient."""
    return not x.requires_grad and _conv_covers(x, conv, maps=1, side=28, out=6)


def conv1(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` for a first convolution followed by something other than pooling (lenet-relu's
    BatchNorm), as contiguous (N, 6, 24, 24) maps; only where ``conv1_covers``."""
    return _Conv1.apply(x, conv.weight, conv.bias)


def first(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``max_pool2d(conv(x), 2, 2)`` for LeNet's first stage; only where ``first_covers``."""
    return _First.apply(x, conv.weight, conv.bias)


def second(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``max_pool2d(conv(x), 2, 2)`` for LeNet's second stage; only where ``second_covers``."""
    return _Second.apply(x, conv.weight, conv.bias)
