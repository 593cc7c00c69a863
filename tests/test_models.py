import copy

import pytest
import torch
from torch import nn

from lenet.errors import ConfigError
from lenet.models import MODELS, TrainingView, count_macs, count_parameters, create_model

# Declared sizes, worked out by hand from the layer shapes.
EXPECTED_PARAMETERS = {
    # conv 6*(25+1) + conv 16*(150+1) + fc 256*120+120 + 120*84+84 + 84*10+10
    "lenet": 156 + 2416 + 30840 + 10164 + 850,
    # no conv biases, BatchNorm adds a scale and shift per channel
    "lenet-relu": 150 + 12 + 2400 + 32 + 30840 + 10164 + 850,
    # no conv biases: conv 16*25 + BN 16*2 + conv 32*16*25 + BN 32*2 + 512*128+128 + 128*10+10
    "lenet-plus": 400 + 32 + 12800 + 64 + 65664 + 1290,
    # 784*54+54 + 54*32+32 + 32*10+10
    "mlp": 42390 + 1760 + 330,
    # C1 6*(25+1), S2 6*2, C3 60*25+16, S4 16*2, C5 120*(400+1), F6 84*(120+1); fixed RBF
    "lenet5": 156 + 12 + 1516 + 32 + 48120 + 10164,
    # the same with a linear output, 84*10+10
    "lenet5-linear": 156 + 12 + 1516 + 32 + 48120 + 10164 + 850,
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_keeps_the_contract(name):
    torch.manual_seed(0)
    model = create_model(name)
    out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    assert torch.isfinite(out).all()
    model.eval()
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 10)
    assert count_parameters(model) == EXPECTED_PARAMETERS[name]
    # Gradients reach every parameter.
    model.train()
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_lenet_has_exactly_the_tutorial_parameter_count():
    assert count_parameters(create_model("lenet")) == 44_426


def tutorial_lenet():
    """The tutorial's network restated independently, as a plain Sequential."""
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5),
        nn.Sigmoid(),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5),
        nn.Sigmoid(),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120),
        nn.Sigmoid(),
        nn.Linear(120, 84),
        nn.Sigmoid(),
        nn.Linear(84, 10),
    )


def test_lenet_computes_what_the_tutorial_network_computes():
    torch.manual_seed(1)
    ours, reference = create_model("lenet"), tutorial_lenet()
    ours_params = list(ours.parameters())
    ref_params = list(reference.parameters())
    assert [p.shape for p in ours_params] == [p.shape for p in ref_params]
    with torch.no_grad():
        for src, dst in zip(ref_params, ours_params):
            dst.copy_(src)
    x = torch.randn(8, 1, 28, 28)
    torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-6)


def test_macs_match_the_layer_arithmetic():
    conv1 = 6 * 24 * 24 * 25
    conv2 = 16 * 8 * 8 * 6 * 25
    linear = 256 * 120 + 120 * 84 + 84 * 10
    assert count_macs(create_model("lenet")) == conv1 + conv2 + linear == 281_640


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ConfigError, match="Known models: lenet, lenet-relu"):
        create_model("alexnet")


@pytest.mark.parametrize("name", ["lenet", "lenet-relu", "lenet-plus"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_training_forward_gives_forwards_outputs_gradients_and_statistics(name, layout):
    torch.manual_seed(2)
    model = create_model(name).to(memory_format=layout).train()
    with torch.no_grad():  # a negative BatchNorm scale: pooling must not move before it
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight[0] = -1.5
    twin = copy.deepcopy(model)
    # Large inputs saturate sigmoids (ties under max-pooling) and spread the pre-activations.
    x = (torch.randn(16, 1, 28, 28) * 4).contiguous(memory_format=layout)

    torch.manual_seed(3)  # the same dropout masks (lenet-plus) in both passes
    expected = model(x)
    torch.manual_seed(3)
    got = TrainingView(twin)(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    expected.square().sum().backward()
    got.square().sum().backward()
    for (where, p), q in zip(model.named_parameters(), twin.parameters()):
        # Against the gradient's own scale: BatchNorm in another memory layout sums in
        # another order (measured: up to 1e-5 of the largest gradient, more with 1 thread).
        scale = float(p.grad.abs().max())
        assert float((q.grad - p.grad).abs().max()) <= 1e-4 * scale + 1e-7, where
    for (where, b), c in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(c, b, msg=where)  # BatchNorm's running statistics


def test_training_view_of_a_model_without_a_training_forward_is_the_model():
    torch.manual_seed(0)
    model = create_model("mlp")
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(TrainingView(model)(x), model(x))
