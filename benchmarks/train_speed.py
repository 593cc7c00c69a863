"""Training speed on this machine: the book's loop against lenet's, and time to 99% accuracy.

    python benchmarks/train_speed.py            # the full benchmark (about 7 minutes on 2 cores)
    python benchmarks/train_speed.py --quick    # a smoke run on a slice of the data
    python benchmarks/train_speed.py --device cuda [--amp bf16]   # lenet's loop on a GPU

Every measurement runs in its own process (so peak memory is its own) on real MNIST, in one
invocation, on the same machine. Printed: the machine, versions, and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from machine import cpu_model  # noqa: E402

TRAIN_FLOP_PER_SAMPLE = 3 * 2 * 281_640  # forward + backward (about 2x forward) of one image


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def task_book_loop(epochs: int, workers: int, quick: bool) -> dict:
    """The tutorial book's loop: a per-sample Dataset, a DataLoader, Adam lr 0.001, batch 256."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from torch.utils.data import Dataset as TorchDataset

    from lenet.data import load_dataset
    from lenet.device import configure_threads
    from lenet.models import create_model

    configure_threads(None)
    data = load_dataset("mnist")
    images, labels = data.train.images.numpy(), data.train.labels.numpy()
    if quick:
        images, labels = images[:5000], labels[:5000]

    class PerSample(TorchDataset):
        # As torchvision's MNIST with ToTensor(): one image converted per __getitem__ call.
        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, i: int):
            return torch.from_numpy(images[i]).float().div(255), int(labels[i])

    loader = DataLoader(PerSample(), batch_size=256, shuffle=True, num_workers=workers)
    torch.manual_seed(0)
    model = create_model("lenet")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - started)
    return {"epoch_seconds": seconds, "samples": len(labels), "workers": workers}


def task_lenet_recipe(
    model: str,
    recipe: str,
    epochs: int | None,
    quick: bool,
    device: str = "auto",
    amp: str = "off",
    allocator: str = "lenet",
) -> dict:
    """`lenet train` with a recipe; test accuracy recorded after every epoch (not timed).

    ``allocator="default"`` leaves glibc's malloc as it comes (lenet's training keeps freed
    blocks for reuse: lenet/allocator.py), to show what that setting is worth.
    """
    import tempfile

    import lenet.training
    from lenet.config import resolve_config
    from lenet.data import Dataset, Split, load_dataset
    from lenet.evaluation import evaluate_model
    from lenet.training import input_normalization, train

    if allocator == "default":
        lenet.training.keep_freed_memory = lambda: False

    data = load_dataset("mnist")
    if quick:
        data = Dataset(
            data.spec,
            Split(data.train.images[:5000], data.train.labels[:5000]),
            data.val,
            data.test,
            data.folder,
        )
    out = tempfile.mkdtemp(prefix="lenet-bench-")
    config = resolve_config(model, recipe, epochs=epochs, out=out, device=device, amp=amp)
    norm = input_normalization(config, data)
    test_curve = []

    def on_epoch_end(metrics: dict, net) -> None:
        test = evaluate_model(net, data.test.images, data.test.labels, norm)
        test_curve.append((metrics["train_seconds"], test.accuracy))

    result = train(config, dataset=data, on_epoch_end=on_epoch_end, progress=False)
    return {
        "epoch_seconds": [h["epoch_seconds"] for h in result.history],
        "samples": len(data.train),
        "test_curve": test_curve,
        "test_accuracy": result.test_accuracy,
        "train_seconds": result.train_seconds,
        "config": result.config.to_dict(),
        "device": result.card["device"],
    }


def task_evaluate(device: str = "cpu") -> dict:
    import torch

    from lenet.data import load_dataset
    from lenet.device import configure_threads
    from lenet.evaluation import evaluate_model
    from lenet.models import Normalization, create_model

    configure_threads(None)
    data = load_dataset("mnist")
    model = create_model("lenet").eval().to(device)
    norm = Normalization(0.1307, 0.3081)
    times = []
    for _ in range(7):
        started = time.perf_counter()
        evaluate_model(model, data.test.images, data.test.labels, norm)
        times.append(time.perf_counter() - started)
    a = torch.randn(2048, 2048, device=device)
    b = torch.randn(2048, 2048, device=device)
    a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(5):
        a @ b
    if device != "cpu":
        torch.cuda.synchronize()  # GPU kernels run asynchronously: wait before reading the clock
    gemm = 5 * 2 * 2048**3 / (time.perf_counter() - started) / 1e9
    return {"eval_seconds": sorted(times)[len(times) // 2], "gemm_gflops": gemm}


def run_task(args: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--task", *args], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"benchmark task {args} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def first_at(curve: list, target: float) -> float | None:
    return next((seconds for seconds, accuracy in curve if accuracy >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run on 5,000 images")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--device", default="auto",
        help="where lenet's loop trains: auto (cuda if present), cpu or cuda; on a GPU the "
        "book's DataLoader rows (a CPU comparison) are left out",
    )  # fmt: skip
    parser.add_argument("--amp", default="off", choices=("off", "bf16"), help="lenet's --amp")
    parser.add_argument(
        "--rounds", type=int, default=3,
        help="alternated rounds of the book's loops and lenet's book recipe (default 3)",
    )  # fmt: skip
    parser.add_argument("--task", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.task:
        kind, *rest = args.task
        quick = "quick" in rest
        options = dict(item.split("=", 1) for item in rest if "=" in item)
        if kind == "book":
            out = task_book_loop(1 if quick else 2, int(rest[0]), quick)
        elif kind == "recipe":
            epochs = None if rest[2] == "-" else int(rest[2])
            out = task_lenet_recipe(rest[0], rest[1], epochs, quick, **options)
        else:
            out = task_evaluate(**options)
        out["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(out))
        return

    import torch

    from lenet.device import configure_threads, resolve_device
    from lenet.errors import LenetError

    try:
        device = resolve_device(args.device)
    except LenetError as exc:  # e.g. --device cuda on a machine without a GPU
        raise SystemExit(f"train_speed: {exc}") from None
    on_gpu = device.type == "cuda"
    q = ["quick"] if args.quick else []
    where = [f"device={device.type}", f"amp={args.amp}"]
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {platform.platform()}")
    if on_gpu:
        print(f"GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"torch threads per run: {configure_threads(None)}"
    )
    print(f"quick mode: {args.quick}; lenet trains on {device.type}, amp {args.amp}\n")
    book_epochs = "1" if args.quick else "2"
    same_recipe = {"book_recipe": ["recipe", "lenet", "book", book_epochs, *q, *where]}
    if not on_gpu:
        same_recipe["book_loop"] = ["book", "0", *q]
        same_recipe["book_loop_4_workers"] = ["book", "4", *q]
    # The book's loops and lenet's in alternated rounds, each figure the median of its
    # rounds: this machine's speed drifts by 15% and more from one minute to the next, and
    # single runs a few minutes apart put the ratio anywhere from 2.7x to 4x.
    results: dict = {key: [] for key in same_recipe}
    for _ in range(1 if args.quick else args.rounds):
        for key, task in same_recipe.items():
            results[key].append(run_task(task))
    if not on_gpu:
        results["book_recipe_default_allocator"] = run_task(
            ["recipe", "lenet", "book", book_epochs, *q, *where, "allocator=default"]
        )
    results["default_lenet"] = run_task(["recipe", "lenet", "default", "-", *q, *where])
    results["default_lenet_relu"] = run_task(["recipe", "lenet-relu", "default", "-", *q, *where])
    results["evaluate"] = run_task(["evaluate", f"device={device.type}"])

    def per_epoch(r: dict | list[dict]) -> tuple[float, float]:
        """Seconds per epoch and samples/s: of one run, or the median of rounds' runs."""
        if isinstance(r, list):
            seconds = statistics.median(per_epoch(one)[0] for one in r)
            return seconds, r[0]["samples"] / seconds
        mean = sum(r["epoch_seconds"]) / len(r["epoch_seconds"])
        return mean, r["samples"] / mean

    def peak(r: dict | list[dict]) -> float:
        return max(one["peak_rss_mb"] for one in r) if isinstance(r, list) else r["peak_rss_mb"]

    ours_s, ours_rate = per_epoch(results["book_recipe"])
    rounds = len(results["book_recipe"])
    print(
        "## Same model, same recipe (Adam lr 0.001, batch 256): seconds per epoch "
        f"(median of {rounds} alternated rounds; each round's ratio in brackets)\n"
    )
    print("| loop | s/epoch | samples/s | lenet is faster by | peak RSS MB |")
    print("|---|---|---|---|---|")
    for key, label in (
        ("book_loop", "book: per-sample Dataset + DataLoader, 0 workers"),
        ("book_loop_4_workers", "book: the same with 4 workers (the book's setting)"),
    ):
        if key not in results:
            continue
        book_s, book_rate = per_epoch(results[key])
        each = ", ".join(
            f"{per_epoch(book)[0] / per_epoch(ours)[0]:.2f}x"
            for book, ours in zip(results[key], results["book_recipe"])
        )
        print(
            f"| {label} | {book_s:.2f} | {book_rate:,.0f} | {book_s / ours_s:.2f}x ({each}) | "
            f"{peak(results[key]):.0f} |"
        )
    if "book_recipe_default_allocator" in results:
        plain_s, plain_rate = per_epoch(results["book_recipe_default_allocator"])
        print(
            f"| `lenet train --recipe book`, glibc's default allocator (freed blocks not kept) "
            f"| {plain_s:.2f} | {plain_rate:,.0f} | {plain_s / ours_s:.2f}x | "
            f"{results['book_recipe_default_allocator']['peak_rss_mb']:.0f} |"
        )
    print(
        f"| `lenet train --recipe book` | {ours_s:.2f} | {ours_rate:,.0f} | 1.00x | "
        f"{peak(results['book_recipe']):.0f} |\n"
    )

    print("## Default recipe: training time until 99.0% MNIST test accuracy\n")
    print("| model | epochs | s to 99.0% | final test acc | s total | samples/s | GFLOP/s "
          "| peak RSS MB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for key, name in (("default_lenet", "lenet"), ("default_lenet_relu", "lenet-relu")):
        r = results[key]
        reached = first_at(r["test_curve"], 0.99)
        _, rate = per_epoch(r)
        print(
            f"| {name} | {len(r['epoch_seconds'])} | "
            f"{f'{reached:.1f}' if reached is not None else 'not reached'} | "
            f"{r['test_accuracy']:.2%} | {r['train_seconds']:.1f} | {rate:,.0f} | "
            f"{rate * TRAIN_FLOP_PER_SAMPLE / 1e9:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    ev = results["evaluate"]
    print(
        f"\nevaluation of the 10,000 test images: {ev['eval_seconds']:.3f} s (median of 7)\n"
        f"machine: 2048x2048 fp32 matmul reaches {ev['gemm_gflops']:.0f} GFLOP/s; one epoch "
        f"of 55,000 training images is {55_000 * TRAIN_FLOP_PER_SAMPLE / 1e9:.0f} GFLOP, so at "
        f"that rate an epoch would take "
        f"{55_000 * TRAIN_FLOP_PER_SAMPLE / 1e9 / ev['gemm_gflops']:.2f} s"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
