"""The model registry: every network lenet can train, with the input it expects.

All models share one contract: they take (N, 1, 28, 28) float tensors (ink light on black,
normalised as the model's ``Normalization`` says) and return (N, 10) logits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lenet import stages
from lenet.errors import ConfigError
from lenet.lenet5 import BACKGROUND, FOREGROUND, LeNet5, SparseConv2d, rbf_loss


@dataclass(frozen=True)
class Normalization:
    """How uint8 pixels become model inputs: ``(pixel / 255 - mean) / std``."""

    mean: float = 0.0
    std: float = 1.0

    def apply(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Turn uint8 images (any shape) into normalised float inputs (a new tensor)."""
        scale = 1.0 / (255.0 * self.std)
        return images.to(dtype, copy=True).mul_(scale).sub_(self.mean / self.std)

    def to_dict(self) -> dict[str, float]:
        """As stored in model cards."""
        return {"mean": self.mean, "std": self.std}


class LeNet(nn.Module):
    """The tutorial's LeNet, exactly: sigmoid activations, max-pooling, 44,426 parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=5),  # (N, 6, 24, 24)
            nn.Sigmoid(),
            nn.MaxPool2d(2, 2),  # (N, 6, 12, 12)
            nn.Conv2d(6, 16, kernel_size=5),  # (N, 16, 8, 8)
            nn.Sigmoid(),
            nn.MaxPool2d(2, 2),  # (N, 16, 4, 4)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (N, 256)
            nn.Linear(256, 120),
            nn.Sigmoid(),
            nn.Linear(120, 84),
            nn.Sigmoid(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``forward``'s outputs and gradients for less work: what training steps run.

        The sigmoid is increasing, so the largest of four sigmoids is the sigmoid of the
        largest input: pooling before the sigmoid gives the same maps with a quarter of the
        sigmoid work, forward and backward. Only where rounding makes sigmoids of different
        inputs equal do the gradients part: ``forward`` sends a window's gradient to the
        first of the tied pixels, this to the largest input. In float32 that happens where
        the sigmoid's slope is 0 anyway (tested: the same gradients); under bf16 autocast,
        which rounds far more values together, the two give different gradients (measured:
        up to 12% on the first layer's). ``forward`` keeps the tutorial's order, which is what
        exports, hooks (``lenet.explain``) and readers of this class see.
        """
        conv1, sigmoid1, pool1, conv2, sigmoid2, pool2 = self.features
        # Each convolution with its pooling, in PyTorch's kernels, made most of a CPU step;
        # lenet's compiled kernels do each in one pass where they are built (lenet.stages).
        if stages.first_covers(x, conv1, pool1):
            x = _sigmoid_of_fresh(stages.first(x, conv1), sigmoid1)
        else:
            x = sigmoid1(pool1(conv1(x)))
        if stages.second_covers(x, conv2, pool2):
            x = _sigmoid_of_fresh(stages.second(x, conv2), sigmoid2)
        else:
            x = sigmoid2(pool2(conv2(x)))
        return self.classifier(x)


def _sigmoid_of_fresh(x: torch.Tensor, sigmoid: nn.Module) -> torch.Tensor:
    """``sigmoid(x)`` for a kernel's fresh output; in place where no gradient is recorded (new
    memory for 10,000 images' maps cost more than the sigmoid). With autograd, a custom
    function's output view may not be changed in place."""
    if type(sigmoid) is nn.Sigmoid and not torch.is_grad_enabled():
        return x.sigmoid_()
    return sigmoid(x)


def _layout_of(weight: torch.Tensor) -> torch.memory_format:
    """The memory format a convolution's weight was put in (the model's ``.to(...)``)."""
    if weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def conv_bn_relu_pool(in_channels: int, out_channels: int) -> list[nn.Module]:
    """A 5x5 convolution, BatchNorm, ReLU and 2x2 max-pooling: LeNet's stage, modernised.

    No convolution bias: the BatchNorm shift that follows makes it redundant.
    """
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=5, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, 2),
    ]


# BatchNorm and pooling in channels-last work on 8 channels at a time (AVX2's 8 floats).
CHANNELS_LAST_MIN_MAPS = 8


def conv_stages_for_training(features: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """What ``conv_bn_relu_pool`` stages compute, in a cheaper order, for training steps.

    ReLU is increasing, so it commutes with max-pooling and runs on the pooled maps (a
    quarter of the work); BatchNorm does not (a negative scale swaps max and min), so it
    stays before the pooling. On a CPU the convolutions run fastest on channels-last tensors
    (measured for lenet-relu: 1.6 against 3.6 ms for a batch's convolution backward), and so
    do BatchNorm and pooling when the maps are at least a vector of floats deep, since those
    kernels vectorise across channels; with fewer maps (lenet-relu's first 6) the contiguous
    kernels win (0.6 against 2.2 ms for BatchNorm), so those maps are made contiguous first.
    Measured for a stage's forward and backward at batch 256 (ms, contiguous -> channels-last
    BatchNorm and pooling): 6 -> 16 maps 8.9 -> 7.6, 1 -> 16 maps 27.9 -> 16.6, 16 -> 32 maps
    18.9 -> 15.5; 1 -> 6 maps 13.5 -> 23.8.
    """
    for conv, norm, relu, pool in zip(*[iter(list(features))] * 4):
        if stages.normalised_first_covers(x, conv, norm, relu, pool):
            x = stages.normalised_first(x, conv, norm)
            continue
        if stages.normalised_covers(x, conv, norm, relu, pool):
            x = stages.normalised(x.contiguous(memory_format=_layout_of(conv.weight)), conv, norm)
            continue
        if stages.folded_covers(x, conv, norm, relu, pool):  # evaluated: BatchNorm folds away
            x = stages.folded(x, conv, norm)
            continue
        if stages.conv1_covers(x, conv):
            # lenet's compiled kernel writes the 6 maps contiguous at once: no layout copies
            # (lenet.stages; 3.5 of lenet-relu's 22 ms a step at batch 256 were such copies).
            x = stages.conv1(x, conv)
        else:
            x = conv(x.contiguous(memory_format=_layout_of(conv.weight)))
        if conv.out_channels < CHANNELS_LAST_MIN_MAPS:
            x = x.contiguous()
        x = relu(pool(norm(x)))
    return x


class LeNetReLU(nn.Module):
    """The same shapes with BatchNorm after each convolution and ReLU: trains much faster."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu_pool(1, 6),  # (N, 6, 12, 12)
            *conv_bn_relu_pool(6, 16),  # (N, 16, 4, 4)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (N, 256)
            nn.Linear(256, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``forward``'s outputs and gradients for less work: what training steps run."""
        return self.classifier(conv_stages_for_training(self.features, x))


class LeNetPlus(nn.Module):
    """LeNet's layout made as accurate as a model of its size can be (80,250 parameters).

    The same two 5x5 convolutions, each followed by 2x2 max-pooling, then two linear layers, but
    wider (16 and 32 maps; 512 features into 128 units), with BatchNorm, ReLU and dropout.
    Width goes where it is cheap: the first layer sees a single channel, and the second works
    on 12x12 maps, so a training step costs about three times the tutorial network's on a
    CPU (benchmarks/results.py trains it). It stays within the 100,000 parameters that the
    literature table calls LeNet-sized.
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu_pool(1, 16),  # (N, 16, 12, 12)
            *conv_bn_relu_pool(16, 32),  # (N, 32, 4, 4)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (N, 512)
            nn.Linear(512, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),  # the widest layer holds most weights: regularise it
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``forward``'s outputs and gradients for less work: what training steps run."""
        return self.classifier(conv_stages_for_training(self.features, x))


class TrainingView(nn.Module):
    """A model seen through its ``training_forward`` (if it has one): the same parameters,
    outputs and gradients (up to how max-pooling breaks ties: see ``LeNet.training_forward``),
    computed the cheaper way. A module, so DistributedDataParallel can wrap it like the model
    itself."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = getattr(self.model, "training_forward", self.model.forward)
        return step(x)


class MLP(nn.Module):
    """A plain multilayer perceptron of LeNet's size (44,480 parameters), for comparison.

    No convolution and no pooling: every pixel has its own weights, so nothing in it is built
    to recognise a digit moved by a few pixels (benchmarks/shift_tolerance.py measures this).
    ReLU rather than sigmoid: the stronger of the two for a network without BatchNorm.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (N, 784)
            # 54 and 32 hidden units bring the parameter count to LeNet's (44,426).
            nn.Linear(784, 54),  # (N, 54)
            nn.ReLU(inplace=True),
            nn.Linear(54, 32),  # (N, 32)
            nn.ReLU(inplace=True),
            nn.Linear(32, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


class Ensemble(nn.Module):
    """Several trained models answering as one: the mean of their calibrated probabilities.

    The output is the log of that mean, so it behaves like logits everywhere else in lenet
    (softmax of it is the averaged probability, argmax the ensemble's digit) and exports to
    ONNX like any model. Each member's own fitted temperature is applied first, so an
    overconfident member does not outvote the others. Members share one input normalisation.
    """

    def __init__(self, members: list[nn.Module], temperatures: list[float] | None = None) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        temperatures = temperatures or [1.0] * len(members)
        # A buffer, so the temperatures are saved and loaded with the weights.
        self.register_buffer("inverse_temperatures", torch.tensor([1.0 / t for t in temperatures]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = torch.stack(
            [
                torch.log_softmax(member(x) * self.inverse_temperatures[i], dim=1)
                for i, member in enumerate(self.members)
            ]
        )
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))


# The model name written on an ensemble's card; its members' names are listed beside it.
ENSEMBLE = "ensemble"


def create_ensemble(member_names: list[str]) -> Ensemble:
    """A freshly initialised ensemble of the named registered models (weights loaded later)."""
    return Ensemble([create_model(name) for name in member_names])


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: how to build it and what input it wants."""

    name: str
    build: Callable[[], nn.Module]
    summary: str
    # True: inputs standardised with the training set's mean and std; False: pixels / 255.
    standardize: bool = True
    # Whether training runs faster with channels-last tensors on a CPU (measured: yes for the
    # sigmoid LeNet; for lenet-relu and lenet-plus because their training_forward hands
    # BatchNorm contiguous maps where they are too few for channels-last kernels). Results are
    # the same either way up to rounding.
    channels_last_on_cpu: bool = False
    # A fixed input normalisation that is part of the model's definition (LeNet-5's -0.1 / 1.175
    # scaling); when set it replaces the dataset statistics whenever inputs are normalised.
    normalization: Normalization | None = None
    # The model's own training loss, loss(logits, targets) -> scalar; None: cross-entropy.
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # Whether the model estimates its loss's curvature (``diagonal_hessian``), which the
    # paper's optimizer needs (`--optimizer sdlm`, lenet/sdlm.py).
    curvature: bool = False


MODELS: dict[str, ModelSpec] = {}

# Pixels / 255 mapped linearly so that paper is -0.1 and ink 1.175, as LeNet-5 was trained.
LENET5_NORMALIZATION = Normalization(
    mean=-BACKGROUND / (FOREGROUND - BACKGROUND), std=1.0 / (FOREGROUND - BACKGROUND)
)


def register(spec: ModelSpec) -> ModelSpec:
    """Add a model to the registry (later modules register theirs the same way)."""
    if spec.name in MODELS:
        raise ValueError(f"model {spec.name!r} is already registered")
    MODELS[spec.name] = spec
    return spec


register(
    ModelSpec(
        "lenet",
        LeNet,
        "the tutorial's LeNet: sigmoid, max-pooling, 28x28 input (unchanged)",
        channels_last_on_cpu=True,
    )
)
register(
    ModelSpec(
        "lenet-relu",
        LeNetReLU,
        "same shapes with BatchNorm after each convolution and ReLU",
        channels_last_on_cpu=True,  # conv_stages_for_training: BatchNorm of 6 maps contiguous
    )
)
register(
    ModelSpec(
        "lenet-plus",
        LeNetPlus,
        "LeNet's layout widened to 16 and 32 maps, BatchNorm, ReLU, dropout: the most accurate "
        "LeNet-sized model (train it with --recipe best)",
        channels_last_on_cpu=True,  # 16 and 32 maps: channels-last throughout
    )
)
register(
    ModelSpec(
        "lenet5",
        LeNet5,
        "LeNet-5 of 1998: 32x32 padded input, scaled tanh, trainable subsampling, sparse C3, "
        "RBF output with fixed digit bitmaps, the paper's loss",
        normalization=LENET5_NORMALIZATION,
        loss=rbf_loss,
        curvature=True,
    )
)
register(
    ModelSpec(
        "lenet5-linear",
        functools.partial(LeNet5, rbf_output=False),
        "lenet5 with a plain linear output layer (84 -> 10) trained with cross-entropy",
        normalization=LENET5_NORMALIZATION,
        curvature=True,
    )
)
register(
    ModelSpec(
        "mlp",
        MLP,
        "a plain perceptron of LeNet's size for comparison: 784-54-32-10, ReLU, no convolution",
    )
)


def get_model_spec(name: str) -> ModelSpec:
    """The spec of model ``name``; a ConfigError listing the known names otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"Unknown model {name!r}. Known models: {', '.join(MODELS)}.") from None


def list_models() -> list[str]:
    """Names of all registered models."""
    return list(MODELS)


def create_model(name: str) -> nn.Module:
    """Build a freshly initialised model by its registered name."""
    return get_model_spec(name).build()


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: nn.Module, input_shape: tuple[int, ...] = (1, 1, 28, 28)) -> int:
    """Multiply-accumulates of one forward pass of one image (convolutions and linear layers)."""
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        per_output = module.in_channels // module.groups * module.kernel_size[0]
        total += output.numel() * per_output * module.kernel_size[1]

    def linear_hook(module: nn.Linear, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    def sparse_conv_hook(module: SparseConv2d, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        # Only real connections cost anything: one kernel's area per connection and pixel.
        total += output.shape[0] * output.shape[2] * output.shape[3] * module.weight.numel()

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, SparseConv2d):
            handles.append(module.register_forward_hook(sparse_conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(input_shape))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total // input_shape[0]
