import torch

from lenet.calibration import expected_calibration_error, fit_temperature


def test_temperature_recovers_a_known_overconfidence():
    # Labels drawn from softmax(z); the model reports 3 * z: the right temperature is 3.
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(20_000, 10, generator=generator) * 2
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=generator).squeeze(1)
    assert abs(fit_temperature(3 * z, labels) - 3.0) < 0.15
    assert abs(fit_temperature(z, labels) - 1.0) < 0.05


def test_ece_by_hand():
    # Two predictions at confidence 0.9 (one right), two at 0.6 (both right).
    probabilities = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = torch.tensor([0, 1, 0, 0])
    # bins: 0.9 -> |0.9 - 0.5| * 2/4 = 0.2 ; 0.6 -> |0.6 - 1.0| * 2/4 = 0.2
    assert abs(expected_calibration_error(probabilities, labels) - 0.4) < 1e-6


def test_scaling_by_the_fitted_temperature_lowers_ece():
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(20_000, 10, generator=generator) * 2
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=generator).squeeze(1)
    overconfident = 4 * z
    t = fit_temperature(overconfident, labels)
    before = expected_calibration_error(torch.softmax(overconfident, 1), labels)
    after = expected_calibration_error(torch.softmax(overconfident / t, 1), labels)
    assert after < before / 3
