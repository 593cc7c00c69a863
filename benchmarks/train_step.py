"""One training step, as lenet runs it against the plain way, side by side in one process.

    python benchmarks/train_step.py                 # lenet, lenet-relu and lenet-plus, batch 128
    python benchmarks/train_step.py --batch-size 256 --models lenet-relu

Plain: the model's own ``forward`` (the tutorial's layer order), contiguous tensors, Adam's
default implementation (on a CPU: one parameter tensor at a time). lenet: what ``lenet train``
runs on a CPU, i.e. the model's ``training_forward`` through ``TrainingView``, channels-last
where the model registry says so, and the optimizer from ``make_optimizer`` (fused Adam where
torch has it); for the tutorial's ``lenet`` that includes lenet's compiled convolution and
pooling stages (lenet/stages.py), and a third column gives lenet's way without them
(PyTorch's kernels). All train on the same real MNIST batches, in rounds that alternate between
them, so that this machine's drifting speed hits all alike; printed are the median and
fastest round, in ms a step.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from machine import cpu_model  # noqa: E402

from lenet import stages  # noqa: E402
from lenet.config import resolve_config  # noqa: E402
from lenet.data import load_dataset  # noqa: E402
from lenet.device import configure_threads  # noqa: E402
from lenet.models import TrainingView, create_model, get_model_spec  # noqa: E402
from lenet.training import input_normalization, make_optimizer  # noqa: E402


def contender(
    name: str, lenet_way: bool, images: torch.Tensor, batch: int, kernels: bool = True
) -> dict:
    torch.manual_seed(0)
    config = resolve_config(name, batch_size=batch)
    channels_last = lenet_way and get_model_spec(name).channels_last_on_cpu
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(name).to(memory_format=layout).train()
    if lenet_way:
        optimizer = make_optimizer(config, model)
        step_model = TrainingView(model)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        step_model = model
    return {
        "step_model": step_model,
        "optimizer": optimizer,
        "images": images.contiguous(memory_format=layout),
        "rounds": [],
        "kernels": kernels,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="lenet,lenet-relu,lenet-plus")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=12, help="rounds per contender")
    parser.add_argument("--steps", type=int, default=30, help="steps per round")
    args = parser.parse_args()
    configure_threads(None)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {platform.platform()}")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, batch {args.batch_size}"
    )
    data = load_dataset("mnist")
    print(
        "\n| model | plain ms/step | lenet, PyTorch's kernels ms/step | lenet ms/step "
        "| plain samples/s | lenet samples/s | gain |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        norm = input_normalization(resolve_config(name), data)
        images, labels = norm.apply(data.train.images), data.train.labels
        ways = [(False, True), (True, False), (True, True)]  # (lenet's way, compiled kernels)
        if name != "lenet" or stages.variant() is None:  # the kernels serve lenet alone
            ways = [(False, True), (True, True)]
        contenders = [contender(name, way, images, args.batch_size, k) for way, k in ways]
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        start = 0
        for _ in range(args.rounds):
            for c in contenders:
                stages.enabled = c["kernels"]
                started = time.perf_counter()
                for step in range(args.steps):
                    at = (start + step * args.batch_size) % (len(labels) - args.batch_size)
                    index = order[at : at + args.batch_size]
                    x, y = c["images"][index], labels[index]
                    logits = c["step_model"](x)
                    loss = F.cross_entropy(logits, y)
                    c["optimizer"].zero_grad(set_to_none=True)
                    loss.backward()
                    c["optimizer"].step()
                    loss.item()  # as the training loop reads them every step
                    int((logits.argmax(1) == y).sum())
                c["rounds"].append((time.perf_counter() - started) / args.steps * 1e3)
            start += args.steps * args.batch_size
        stages.enabled = True
        # The first two rounds warm caches and allocators up.
        medians = [statistics.median(c["rounds"][2:]) for c in contenders]
        fastest = [min(c["rounds"][2:]) for c in contenders]
        cells = [f"{m:.2f} (fastest {f:.2f})" for m, f in zip(medians, fastest)]
        if len(cells) == 2:
            cells.insert(1, "-")
        plain, ours = medians[0], medians[-1]
        print(
            f"| {name} | {' | '.join(cells)} | {args.batch_size / plain * 1e3:,.0f} | "
            f"{args.batch_size / ours * 1e3:,.0f} | {plain / ours:.2f}x |"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
