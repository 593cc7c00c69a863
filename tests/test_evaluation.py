import numpy as np
import torch
from torch import nn

from lenet.evaluation import evaluate_model
from lenet.models import Normalization


class FixedPredictions(nn.Module):
    """Returns logits that predict a given class for each image (read from pixel 0)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        predicted = x[:, 0, 0, 0].round().long()
        return nn.functional.one_hot(predicted, 10).float() * 5 + self.dummy


def test_metrics_agree_with_a_plain_numpy_computation():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 10, 500)
    predicted = np.where(rng.random(500) < 0.7, truth, rng.integers(0, 10, 500))
    images = torch.zeros(500, 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.from_numpy(predicted).to(torch.uint8)
    result = evaluate_model(
        FixedPredictions(), images, torch.from_numpy(truth), Normalization(0.0, 1 / 255),
        batch_size=64,
    )  # fmt: skip
    confusion = np.zeros((10, 10), int)
    for t, p in zip(truth, predicted):
        confusion[t, p] += 1
    assert result.confusion.tolist() == confusion.tolist()
    assert result.count == 500 and result.confusion.sum() == 500
    assert result.accuracy == np.mean(truth == predicted)
    for c in range(10):
        tp = np.sum((truth == c) & (predicted == c))
        precision = tp / max(np.sum(predicted == c), 1)
        recall = tp / max(np.sum(truth == c), 1)
        assert abs(result.precision[c] - precision) < 1e-6
        assert abs(result.recall[c] - recall) < 1e-6
    logits = torch.nn.functional.one_hot(torch.from_numpy(predicted), 10).float() * 5
    expected_loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(truth)).item()
    assert abs(result.loss - expected_loss) < 1e-5


def test_evaluation_through_the_compiled_stages_gives_forwards_answers(mnist, monkeypatch):
    # Evaluation runs the models' cheaper order (lenet's compiled stages where they cover the
    # model); on the 10,000 real test images it must answer as model.forward does.
    from lenet import stages
    from lenet.evaluation import predict_logits
    from lenet.weights import load_weights

    ran = []
    original = stages._run
    monkeypatch.setattr(stages, "_run", lambda *a, **k: ran.append(1) or original(*a, **k))
    for name in ("lenet", "lenet-relu"):
        loaded = load_weights(name)
        ran.clear()
        fast = predict_logits(loaded.model, mnist.test.images, loaded.normalization)
        assert bool(ran) == stages.available(), name  # the compiled stages did run
        plain = predict_logits(
            loaded.model, mnist.test.images, loaded.normalization, compiled=False
        )
        assert fast.shape == plain.shape == (10_000, 10)
        assert torch.equal(fast.argmax(1), plain.argmax(1)), name
        torch.testing.assert_close(fast, plain, rtol=0, atol=1e-4)
