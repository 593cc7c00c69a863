import pytest
import torch

from lenet.averaging import WARMUP, weight_average
from lenet.checkpoint import CHECKPOINT_NAME
from lenet.config import resolve_config
from lenet.errors import ConfigError
from lenet.evaluation import evaluate_model
from lenet.models import create_model
from lenet.training import train
from lenet.weights import load_weights


def test_the_average_follows_the_warmed_up_exponential_formula():
    torch.manual_seed(0)
    model = create_model("lenet-relu")
    decay = 0.9
    average = weight_average(model, decay)
    expected: dict[str, torch.Tensor] = {}
    for update in range(120):  # past update 80, where the decay takes over from the warm-up
        with torch.no_grad():  # stands in for an optimizer step (parameters and statistics)
            for tensor in (*model.parameters(), *model.buffers()):
                if tensor.is_floating_point():
                    tensor.add_(torch.randn_like(tensor))
                else:
                    tensor.add_(1)
        average.update_parameters(model)
        current = model.state_dict()
        # The reference: the first update copies; then each update keeps min(decay,
        # (1 + n) / (WARMUP + n)) of the average, n being the updates made before it.
        kept = min(decay, (1 + update) / (WARMUP + update))
        for name, value in current.items():
            if update == 0 or not value.is_floating_point():
                expected[name] = value.clone()
            else:
                expected[name] = kept * expected[name] + (1 - kept) * value
    assert kept == decay  # both terms of the min were exercised
    got = average.module.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_a_run_with_ema_saves_and_reports_the_average(small_mnist, tmp_path):
    config = resolve_config(
        "lenet-relu", epochs=1, batch_size=256, train_limit=4096, ema=0.95, out=str(tmp_path)
    )
    result = train(config, dataset=small_mnist, progress=False)
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    loaded = load_weights(result.weights)
    weights = loaded.model.state_dict()
    averaged = {k.removeprefix("module."): v for k, v in saved["ema"].items()}
    differs = False
    for name, value in weights.items():
        assert torch.equal(value, averaged[name].contiguous()), name
        differs |= not torch.equal(value, saved["model"][name].contiguous())
    assert differs  # the last step's weights are not what was saved
    assert int(saved["ema"]["n_averaged"]) == 4096 // 256  # one update a step
    # The figures reported are those of the saved (averaged) weights.
    again = evaluate_model(
        loaded.model, small_mnist.test.images, small_mnist.test.labels, loaded.normalization
    )
    assert again.accuracy == result.test_accuracy
    held_out = evaluate_model(
        loaded.model, small_mnist.val.images, small_mnist.val.labels, loaded.normalization
    )
    assert held_out.accuracy == result.history[-1]["val_accuracy"]
    assert "--ema 0.95" in result.card["command"]


@pytest.mark.parametrize("decay", [1.0, 0.3, -0.1])
def test_an_unusable_decay_is_refused(decay):
    with pytest.raises(ConfigError, match="--ema"):
        resolve_config("lenet", ema=decay)
