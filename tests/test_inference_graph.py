import pytest
import torch
from torch import nn

from lenet.backends import bundled_onnx
from lenet.export import read_metadata
from lenet.inference_graph import CHANNEL_BLOCK, InferenceGraph, inference_graph
from lenet.models import create_ensemble, create_model


def trained_looking(name: str) -> nn.Module:
    """A model whose BatchNorm layers have running statistics and one negative scale."""
    torch.manual_seed(0)
    model = create_model(name).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(64, 1, 28, 28) * 2 + 0.5)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight[0] = -1.3  # max-pooling must not move before BatchNorm
                module.bias[1] = 0.7
    return model.eval()


@pytest.mark.parametrize("name", ["lenet", "lenet-relu", "lenet-plus"])
def test_the_rewritten_graph_computes_the_models_function(name):
    model = trained_looking(name)
    graph = inference_graph(model)
    assert isinstance(graph, InferenceGraph)
    # Large inputs saturate sigmoids and spread pre-activations over both signs.
    x = torch.randn(64, 1, 28, 28) * 4
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), rtol=0, atol=1e-5)
    convs = [stage.conv for stage in graph.stages]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in graph.modules())  # folded
    for conv, following in zip(convs, convs[1:]):
        assert conv.out_channels % CHANNEL_BLOCK == 0  # padded for the blocked kernels
        assert following.in_channels == conv.out_channels
    original = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs[-1].out_channels == original[-1].out_channels  # the classifier's input


def test_models_of_other_layouts_and_training_mode_are_left_as_they_are():
    for model in (create_model("lenet5"), create_model("mlp"), create_ensemble(["lenet"] * 2)):
        assert inference_graph(model.eval()) is model
    training = create_model("lenet").train()
    assert inference_graph(training) is training  # BatchNorm statistics are still moving


def test_the_bundled_onnx_files_hold_the_rewritten_graph():
    onnx = pytest.importorskip("onnx")
    bundled = bundled_onnx()
    assert set(bundled) == {"lenet", "lenet-relu"}
    for name, path in bundled.items():
        assert "BatchNorm folded" in read_metadata(path)["graph"]
        proto = onnx.load(str(path))
        ops = [node.op_type for node in proto.graph.node]
        # Pooling comes straight after each convolution, the activation after the pooling.
        assert ops[:3] == ["Conv", "MaxPool", "Sigmoid" if name == "lenet" else "Relu"]
        first = next(i for i in proto.graph.initializer if i.name == proto.graph.node[0].input[1])
        assert first.dims[0] == CHANNEL_BLOCK
