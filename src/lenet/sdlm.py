"""The stochastic diagonal Levenberg-Marquardt method that trained LeNet-5 (LeCun, Bottou, Bengio
and Haffner 1998, appendix C; LeCun, Bottou, Orr and Mueller, "Efficient BackProp", 1998).

Each parameter w_k gets its own rate, the global rate divided by mu plus an estimate h_kk of
the loss's second derivative with respect to it: steps shrink where the loss curves sharply
and grow where it is flat. The estimates come from a few hundred training images before each
pass over the data (the paper: 500), through the model's ``diagonal_hessian(images)``
(LeNet5 has one), and stay fixed during the pass.

How this differs from the paper, and why: the paper updated after every image; here an update
follows a batch (``--batch-size 1`` is the paper's way, at 60,000 Python-level steps a pass).
The paper's rate does not carry over: the per-image 0.0005 times 32 diverged in batches of 32,
and so did 0.0005 per image with these estimates; the README has the measurements.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# The paper's mu: it keeps a rate finite where the curvature estimate is near zero.
MU = 0.02
# Images the curvature is estimated on before each pass (the paper's 500).
CURVATURE_IMAGES = 500
# The paper's global rates per pass: 0.0005 for 2 passes, 0.0002 for 3, 0.0001 for 3,
# 0.00005 for 4, then 0.00001; as multiples of the first (``lenet train --schedule paper``).
PASS_RATES = ((2, 1.0), (3, 0.4), (3, 0.2), (4, 0.1))
LATE_RATE = 0.02


def paper_rate(epoch: int) -> float:
    """The paper's rate for pass ``epoch`` (counted from 0), as a multiple of the first."""
    for passes, rate in PASS_RATES:
        if epoch < passes:
            return rate
        epoch -= passes
    return LATE_RATE


class SDLM(torch.optim.Optimizer):
    """w_k <- w_k - lr / (mu + h_kk) * dE/dw_k, with h_kk set by ``estimate_curvature``."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, mu: float = MU) -> None:
        if lr <= 0 or mu <= 0:
            raise ValueError(f"SDLM needs a positive rate and mu, got lr={lr}, mu={mu}")
        super().__init__(params, {"lr": lr, "mu": mu})

    @torch.no_grad()
    def estimate_curvature(self, model: torch.nn.Module, images: torch.Tensor) -> None:
        """Set every parameter's rate divisor from ``model.diagonal_hessian(images)``."""
        if not callable(getattr(model, "diagonal_hessian", None)):
            raise TypeError(f"{type(model).__name__} cannot estimate its curvature for SDLM")
        with torch.enable_grad():
            hessian = model.diagonal_hessian(images)
        names = {id(param): name for name, param in model.named_parameters()}
        for group in self.param_groups:
            for param in group["params"]:
                h = hessian[names[id(param)]]
                # Stored as the divisor's reciprocal: each step multiplies instead of dividing.
                self.state[param]["scale"] = 1.0 / (group["mu"] + h.clamp_min(0))

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                scale = self.state[param].get("scale")
                if scale is None:
                    raise RuntimeError(
                        "SDLM has no curvature estimate yet: call estimate_curvature(model, "
                        "images) before the first step (lenet train does, before every pass)."
                    )
                param.addcmul_(param.grad, scale, value=-group["lr"])
