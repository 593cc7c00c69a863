"""The network an ONNX export holds: the model's own function, arranged for fast CPU inference.

Three rewrites, each leaving the outputs as they are (up to float rounding; the export's parity
check on the 10,000 MNIST test images proves it for every file):

- BatchNorm (inference mode: a fixed scale and shift per channel) is folded into the
  convolution before it.
- Max-pooling moves before the activation. Sigmoid, tanh and ReLU are increasing, so the
  largest activation of a window is the activation of its largest input: the activation then
  runs on a quarter of the values.
- Convolutions that feed another convolution get zero filters up to a multiple of 8 output
  channels (and the next convolution zero weights for them). onnxruntime's blocked CPU
  convolutions (NCHWc) work in blocks of 8 channels; with 6, every such layer converts its
  output back to the plain layout for the next (20% of lenet's inference time, profiled).
  The added channels hold a constant that the next layer multiplies by zero. (With AVX-512,
  onnxruntime's blocks are 16 channels; not measured here.)

Measured with onnxruntime on the 10,000 test images, 2 threads (benchmarks/inference_speed.py
gives the figures of the bundled files): about 15-20% more images a second than the model
exported as it is. A model whose layers are not the plain convolution stages below (lenet5,
the MLP, an ensemble) is exported as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Channel blocks of onnxruntime's NCHWc convolutions with AVX2 (8 float32 lanes).
CHANNEL_BLOCK = 8
INCREASING = (nn.Sigmoid, nn.Tanh, nn.ReLU)
# What an export's metadata says of a rewritten graph, for anyone who opens the file.
GRAPH_NOTE = (
    "the model's function rearranged for CPU inference (lenet.inference_graph): BatchNorm "
    "folded into the convolutions, max-pooling before each increasing activation, zero filters "
    f"padding inner convolutions to multiples of {CHANNEL_BLOCK} channels"
)


class _Stage(nn.Module):
    """Convolution, then max-pooling, then the activation."""

    def __init__(self, conv: nn.Conv2d, pool: nn.MaxPool2d, activation: nn.Module) -> None:
        super().__init__()
        self.conv, self.pool, self.activation = conv, pool, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.pool(self.conv(x)))


class InferenceGraph(nn.Module):
    """The convolution stages of ``inference_graph``, then the model's own classifier."""

    def __init__(self, stages: list[_Stage], classifier: nn.Module) -> None:
        super().__init__()
        self.stages = nn.Sequential(*stages)
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.stages(x))


def _stages_of(features: nn.Module) -> list[list[nn.Module]] | None:
    """[conv, (batchnorm), activation, maxpool] groups, or None for any other layout."""
    if not isinstance(features, nn.Sequential):
        return None
    groups: list[list[nn.Module]] = []
    for layer in features:
        if isinstance(layer, nn.Conv2d):
            groups.append([layer])
        elif not groups or isinstance(groups[-1][-1], nn.MaxPool2d):
            return None  # a layer outside a convolution stage
        else:
            groups[-1].append(layer)
    for group in groups:
        kinds = [type(layer) for layer in group]
        plain = len(group) == 3 and isinstance(group[1], INCREASING)
        normed = len(group) == 4 and kinds[1] is nn.BatchNorm2d and isinstance(group[2], INCREASING)
        if not (plain or normed) or not isinstance(group[-1], nn.MaxPool2d):
            return None
        if group[0].groups != 1 or group[0].padding_mode != "zeros":
            return None
        if normed and group[1].running_var is None:  # batch statistics even in eval mode
            return None
    return groups or None


def _folded(conv: nn.Conv2d, norm: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The convolution's weight and bias with an inference-mode BatchNorm folded in."""
    weight = conv.weight.detach().float()
    bias = (
        conv.bias.detach().float()
        if conv.bias is not None
        else torch.zeros(conv.out_channels, dtype=torch.float32, device=weight.device)
    )
    if norm is None:
        return weight, bias
    assert norm.running_var is not None and norm.running_mean is not None  # _stages_of checked
    scale = torch.rsqrt(norm.running_var.float() + norm.eps)
    shift = -norm.running_mean.float() * scale
    if norm.affine:
        gamma, beta = norm.weight.detach().float(), norm.bias.detach().float()
        scale, shift = scale * gamma, shift * gamma + beta
    return weight * scale.view(-1, 1, 1, 1), bias * scale + shift


def inference_graph(model: nn.Module) -> nn.Module:
    """``model`` (in eval mode) rewritten as the module docstring says, or ``model`` itself."""
    features, classifier = getattr(model, "features", None), getattr(model, "classifier", None)
    groups = _stages_of(features) if classifier is not None else None
    if groups is None or model.training:
        return model
    stages: list[_Stage] = []
    added_inputs = 0  # zero channels the previous stage added
    for i, group in enumerate(groups):
        conv, activation, pool = group[0], group[-2], group[-1]
        weight, bias = _folded(conv, group[1] if len(group) == 4 else None)
        last = i == len(groups) - 1  # its channels are the classifier's input: kept as they are
        added = 0 if last else -weight.shape[0] % CHANNEL_BLOCK
        # Zero weights for the previous stage's added maps (dim 1), zero filters (dim 0).
        weight = F.pad(weight, (0, 0, 0, 0, 0, added_inputs, 0, added))
        bias = F.pad(bias, (0, added))
        rewritten = nn.Conv2d(
            weight.shape[1],
            weight.shape[0],
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
        )
        with torch.no_grad():
            rewritten.weight.copy_(weight)
            rewritten.bias.copy_(bias)
        stages.append(_Stage(rewritten, pool, activation))
        added_inputs = added
    return InferenceGraph(stages, classifier).eval()
