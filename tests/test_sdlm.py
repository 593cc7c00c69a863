"""The 1998 paper's optimizer: LeNet5's curvature estimates checked against autograd's exact
second derivatives and against the appendix's rules written out by hand, the update rule, the
per-pass rates, and a resumed run that ends with the uninterrupted run's weights."""

import signal

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lenet.config import resolve_config
from lenet.errors import ConfigError
from lenet.lenet5 import LeNet5, rbf_loss
from lenet.sdlm import MU, SDLM, paper_rate
from lenet.training import TrainingInterrupted, train


def squash_gain(model: LeNet5, a: torch.Tensor) -> torch.Tensor:
    """f'(a)^2 for the paper's f(a) = A tanh(S a)."""
    f = model.squash
    return (f.amplitude * f.slope * (1 - torch.tanh(f.slope * a) ** 2)) ** 2


def activations(model: LeNet5, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every layer's input and pre-activation, computed the plain way."""
    f = model.squash
    with torch.no_grad():
        out = {"x0": F.pad(x, (2, 2, 2, 2), value=model.pad_value)}
        out["a1"] = model.c1(out["x0"])
        out["a2"] = model.s2(f(out["a1"]))
        out["a3"] = model.c3(f(out["a2"]))
        out["x3"] = f(out["a3"])
        out["a4"] = model.s4(out["x3"])
        out["x4"] = f(out["a4"])
        out["a5"] = model.c5(out["x4"]).flatten(1)
        out["x5"] = f(out["a5"])
        out["a6"] = model.f6(out["x5"])
        out["x6"] = f(out["a6"])
    return out


@pytest.fixture
def rbf_model() -> LeNet5:
    torch.manual_seed(0)
    return LeNet5().double()


@pytest.mark.parametrize("far", [False, True])
def test_output_curvature_is_the_exact_second_derivative_of_equation_nine(rbf_model, far):
    if far:  # F6 outputs pushed past every centre: penalties above j, the rubbish term counts
        with torch.no_grad():
            rbf_model.f6.bias.add_(4.0)
    x = torch.randn(4, 1, 28, 28, dtype=torch.double)
    hessian = rbf_model.diagonal_hessian(x)
    acts = activations(rbf_model, x)
    weight, bias = torch.zeros_like(rbf_model.f6.weight), torch.zeros_like(rbf_model.f6.bias)
    for n in range(len(x)):
        for label in (0, 7):  # eq. (9)'s second derivative does not depend on the label

            def loss(x6, label=label):
                return rbf_loss(-rbf_model.output(x6[None]), torch.tensor([label]))

            exact = torch.autograd.functional.hessian(loss, acts["x6"][n]).diagonal()
            if label == 0:
                reference = exact
            torch.testing.assert_close(exact, reference)
        # F6 is the last trained layer: d2E/dw_kj2 = x5_j^2 f'(a6_k)^2 d2E/dx6_k2.
        per_unit = reference * squash_gain(rbf_model, acts["a6"][n])
        weight += per_unit[:, None] * acts["x5"][n][None, :] ** 2
        bias += per_unit
    torch.testing.assert_close(hessian["f6.weight"], weight / len(x))
    torch.testing.assert_close(hessian["f6.bias"], bias / len(x))
    assert all((h >= 0).all() for h in hessian.values())
    assert hessian.keys() == dict(rbf_model.named_parameters()).keys()


def test_deeper_layers_follow_the_appendix_rules_written_out(rbf_model):
    # C5 and S4 by hand: d2E/da = f'(a)^2 sum_k w_k^2 d2E/da_k downstream, and a shared
    # weight's second derivative sums x^2 d2E/da over every connection that uses it.
    x = torch.randn(3, 1, 28, 28, dtype=torch.double)
    hessian = rbf_model.diagonal_hessian(x)
    acts = activations(rbf_model, x)
    f6_bias = hessian["f6.bias"] * len(x)  # its per-image terms are d2E/da6, summed
    # d2E/da6 per image: recover it from the exact output curvature as the test above does.
    h_a6 = torch.stack(
        [
            torch.autograd.functional.hessian(
                lambda x6: rbf_loss(-rbf_model.output(x6[None]), torch.tensor([0])),
                acts["x6"][n],
            ).diagonal()
            * squash_gain(rbf_model, acts["a6"][n])
            for n in range(len(x))
        ]
    )
    torch.testing.assert_close(h_a6.sum(0), f6_bias)
    h_a5 = squash_gain(rbf_model, acts["a5"]) * (h_a6 @ rbf_model.f6.weight**2)  # (N, 120)
    c5 = torch.einsum("nc,niuv->ciuv", h_a5, acts["x4"] ** 2) / len(x)
    torch.testing.assert_close(hessian["c5.weight"], c5)
    torch.testing.assert_close(hessian["c5.bias"], h_a5.mean(0))
    # S4's 16 coefficients: each unit sums a 2x2 block of x3, so each block contributes the
    # sum of its four squares.
    h_a4 = squash_gain(rbf_model, acts["a4"]) * torch.einsum(
        "nc,cduv->nduv", h_a5, rbf_model.c5.weight**2
    )
    block_squares = F.avg_pool2d(acts["x3"] ** 2, 2) * 4
    torch.testing.assert_close(hessian["s4.weight"], (h_a4 * block_squares).sum((2, 3)).mean(0))
    torch.testing.assert_close(hessian["s4.bias"], h_a4.sum((2, 3)).mean(0))


def test_linear_variant_uses_cross_entropys_p_times_one_minus_p():
    torch.manual_seed(1)
    model = LeNet5(rbf_output=False).double()
    x = torch.randn(3, 1, 28, 28, dtype=torch.double)
    hessian = model.diagonal_hessian(x)
    acts = activations(model, x)
    p = torch.softmax(model.output(acts["x6"]), 1)
    h_out = p * (1 - p)
    torch.testing.assert_close(
        hessian["output.weight"], torch.einsum("nk,nj->kj", h_out, acts["x6"] ** 2) / len(x)
    )
    h_a6 = squash_gain(model, acts["a6"]) * (h_out @ model.output.weight**2)
    torch.testing.assert_close(hessian["f6.bias"], h_a6.mean(0))
    # C3's absent connections have no weights, so nothing else can be asked of them; the
    # present ones all get a positive estimate.
    assert (hessian["c3.weight"] > 0).all()


def test_an_update_divides_the_rate_by_mu_plus_the_curvature(rbf_model):
    model = rbf_model.float()
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8)
    optimizer = SDLM(model.parameters(), lr=0.01)
    rbf_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="estimate_curvature"):
        optimizer.step()
    optimizer.estimate_curvature(model, x)
    hessian = model.diagonal_hessian(x)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer.step()
    for name, param in model.named_parameters():
        expected = before[name] - 0.01 * param.grad / (MU + hessian[name])
        torch.testing.assert_close(param.detach(), expected, rtol=1e-6, atol=1e-7)
        assert not torch.equal(param.detach(), before[name])


def test_paper_schedule_gives_the_rates_of_each_pass():
    # 0.0005 for 2 passes, 0.0002 for 3, 0.0001 for 3, 0.00005 for 4, then 0.00001.
    rates = [0.0005 * paper_rate(epoch) for epoch in range(14)]
    expected = [5e-4] * 2 + [2e-4] * 3 + [1e-4] * 3 + [5e-5] * 4 + [1e-5] * 2
    assert rates == pytest.approx(expected)


def test_sdlm_is_refused_for_a_model_without_a_curvature_estimate():
    with pytest.raises(ConfigError, match="sdlm.*lenet5"):
        resolve_config("lenet", optimizer="sdlm")
    with pytest.raises(ConfigError, match="recipe paper"):
        resolve_config("lenet-relu", recipe="paper")
    paper = resolve_config("lenet5", recipe="paper")
    assert (paper.optimizer, paper.schedule, paper.epochs, paper.batch_size) == (
        "sdlm", "paper", 20, 32,
    )  # fmt: skip
    assert resolve_config("lenet5-linear", recipe="paper").lr > paper.lr


def test_a_resumed_sdlm_run_ends_with_the_uninterrupted_weights(small_mnist, tmp_path, monkeypatch):
    # The curvature is estimated before each pass and carried by the checkpoint within one:
    # interrupted mid-way through pass 2 and resumed, the run repeats no estimate and misses
    # none, so its weights are the uninterrupted run's to the bit.
    common = dict(
        epochs=2, batch_size=32, lr=0.0004, optimizer="sdlm", schedule="paper",
        train_limit=2048, threads=1, seed=2,
    )  # fmt: skip
    straight = train(
        resolve_config("lenet5", out=str(tmp_path / "a"), **common), dataset=small_mnist
    )
    config = resolve_config("lenet5", out=str(tmp_path / "b"), **common)
    real_step, calls = SDLM.step, []

    def step_then_ctrl_c(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 64 + 5:  # 64 steps a pass
            signal.raise_signal(signal.SIGINT)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(SDLM, "step", step_then_ctrl_c)
    with pytest.raises(TrainingInterrupted):
        train(config, dataset=small_mnist)
    monkeypatch.setattr(SDLM, "step", real_step)
    resumed = train(config, resume=True, dataset=small_mnist)
    a, b = load_file(straight.weights), load_file(resumed.weights)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # It learned; each pass ends at the rate the next one starts with (the paper's 1 and 0.4).
    assert [h["lr"] for h in straight.history] == pytest.approx([0.0004, 0.00016])
    assert straight.val_accuracy > 0.5
