"""Inference speed of the bundled models on every backend, side by side, in one run.

    python benchmarks/inference_speed.py [--models lenet-relu,lenet]

Prints the machine, versions and, per model, images/s for batches of 1, 64 and 10,000 MNIST
test images (already normalised: the model alone) on PyTorch eager, PyTorch with inference
optimizations (TorchScript frozen; lenet's compiled stages, which lenet's torch backend runs),
onnxruntime float (as `lenet export` writes it, and, as its baseline, with the
layers exported as the model lists them) and onnxruntime int8, then the latency of one 28x28
image in microseconds, then the onnxruntime session settings that were tried. Each figure is
the median of 5 timed passes (the spread in brackets), after a warm-up pass.

    python benchmarks/inference_speed.py --device cuda   # PyTorch on the GPU: fp32 and bf16

With ``--device cuda`` only PyTorch runs, on the GPU (inputs already in GPU memory; each pass
ends with a synchronize, so the figures are of finished work).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import torch
from machine import cpu_model  # noqa: E402

from lenet.backends import ONNX_CHUNK, TORCH_CHUNK, bundled_onnx, normalize, onnx_session_options
from lenet.data import load_dataset
from lenet.export import build_metadata, calibration_inputs, onnx_bytes, quantize_int8
from lenet.models import TrainingView, get_model_spec
from lenet.recognize import Recognizer
from lenet.weights import load_weights

THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
BATCHES = (1, 64, 10_000)
# Batch-1 passes run over fewer images: 10,000 single calls of the slowest engine take seconds.
SINGLE_IMAGES = 2000


def passes(run: Callable[[], None], repeats: int = 5) -> list[float]:
    run()  # warm-up: allocations, first-call graph work
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def throughput(call: Callable[[np.ndarray], object], inputs: np.ndarray, batch: int) -> str:
    """Median images/s (min-max) running ``call`` on consecutive batches of ``inputs``."""
    if batch == 1:
        inputs = inputs[:SINGLE_IMAGES]
    chunks = [inputs[start : start + batch] for start in range(0, len(inputs), batch)]

    def run() -> None:
        for chunk in chunks:
            call(chunk)

    rates = sorted(len(inputs) / t for t in passes(run))
    return f"{statistics.median(rates):,.0f} ({rates[0]:,.0f}-{rates[-1]:,.0f})"


def latency_us(call: Callable[[np.ndarray], object], one: np.ndarray, n: int = 3000) -> str:
    """Median microseconds for one image, over ``n`` calls (5 passes: median of medians)."""
    for _ in range(200):
        call(one)
    medians = []
    for _ in range(5):
        times = []
        for _ in range(n // 5):
            started = time.perf_counter()
            call(one)
            times.append(time.perf_counter() - started)
        medians.append(statistics.median(times) * 1e6)
    medians.sort()
    return f"{statistics.median(medians):.1f} ({medians[0]:.1f}-{medians[-1]:.1f})"


def torch_engines(model: torch.nn.Module, channels_last: bool) -> dict[str, Callable]:
    """PyTorch eager, and the inference optimizations that were measured to help."""
    model = model.eval()

    def eager(x: np.ndarray) -> object:
        with torch.no_grad():
            return model(torch.from_numpy(x))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(model)))

    def optimized(x: np.ndarray) -> object:
        # inference_mode: no autograd bookkeeping at all; freeze folds BatchNorm into the
        # convolutions and inlines the weights; optimize_for_inference pre-packs them for
        # oneDNN (MKLDNN) where it pays. channels_last where the model spec measured it faster.
        with torch.inference_mode():
            batch = torch.from_numpy(x)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            return frozen(batch)

    view = TrainingView(model)

    def compiled(x: np.ndarray) -> object:
        # What lenet's torch backend runs: the model's cheaper order, through lenet's compiled
        # stages where they cover it (lenet; lenet-relu with its BatchNorm folded), under
        # inference_mode.
        # In the backend's chunks (TORCH_CHUNK), as TorchModel.logits runs them.
        with torch.inference_mode():
            batch = torch.from_numpy(x)
            return torch.cat(
                [view(batch[s : s + TORCH_CHUNK]) for s in range(0, len(batch), TORCH_CHUNK)]
            )

    return {
        "torch eager (no_grad)": eager,
        "torch jit.freeze + optimize_for_inference": optimized,
        "torch, lenet's compiled stages (lenet's torch backend)": compiled,
    }


def ort_session(model: bytes, threads: int, level: object, mode: object) -> ort.InferenceSession:
    options = onnx_session_options(threads)
    options.graph_optimization_level = level
    options.execution_mode = mode
    if threads > 1:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def ort_call(session: ort.InferenceSession) -> Callable[[np.ndarray], object]:
    name = session.get_inputs()[0].name

    def call(x: np.ndarray) -> object:
        # Cache-sized chunks, as lenet's OnnxModel does: one call on 10,000 images is slower.
        return [
            session.run(None, {name: x[start : start + ONNX_CHUNK]})
            for start in range(0, len(x), ONNX_CHUNK)
        ]

    return call


def ort_bound_one(session: ort.InferenceSession) -> Callable[[np.ndarray], np.ndarray]:
    """One image through input and output buffers bound once (onnxruntime's IO binding): each
    call copies the image in and runs, without converting arrays to and from OrtValues."""
    image = np.zeros((1, 1, 28, 28), np.float32)
    logits = np.zeros((1, 10), np.float32)
    binding = session.io_binding()
    binding.bind_ortvalue_input(
        session.get_inputs()[0].name, ort.OrtValue.ortvalue_from_numpy(image)
    )
    binding.bind_ortvalue_output(
        session.get_outputs()[0].name, ort.OrtValue.ortvalue_from_numpy(logits)
    )

    def call(x: np.ndarray) -> np.ndarray:
        np.copyto(image, x)
        session.run_with_iobinding(binding)
        return logits

    return call


def ort_parallel(model: bytes, workers: int) -> Callable[[np.ndarray], object]:
    """``workers`` one-thread sessions, each on its share of the chunks (onnxruntime releases
    the GIL while it runs): no synchronisation inside an operator, unlike intra-op threads."""
    sessions = [
        ort_session(
            model, 1, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.ExecutionMode.ORT_SEQUENTIAL
        )
        for _ in range(workers)
    ]
    calls = [ort_call(s) for s in sessions]

    def call(x: np.ndarray) -> object:
        if len(x) < workers * ONNX_CHUNK:
            return calls[0](x)
        parts = np.array_split(x, workers)
        threads = [threading.Thread(target=c, args=(p,)) for c, p in zip(calls, parts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return None

    return call


def gpu_main(models: list[str], device: torch.device) -> None:
    """Images/s of PyTorch on ``device`` in fp32 and under bf16 autocast, per batch size."""
    print(f"GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, "
          f"torch {torch.__version__}, python {platform.python_version()}")  # fmt: skip
    print(f"command: python {' '.join(sys.argv)}\n")
    data = load_dataset("mnist")
    labels = data.test.labels.to(device)
    for name in models:
        loaded = load_weights(name, device)
        inputs = loaded.normalization.apply(data.test.images.to(device))

        def fp32(x: torch.Tensor, model: torch.nn.Module = loaded.model) -> torch.Tensor:
            return model(x)

        def bf16(x: torch.Tensor, model: torch.nn.Module = loaded.model) -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(x).float()

        print(f"## {name} on {device} ({loaded.card.get('parameters', '?'):,} parameters)\n")
        print("| engine | batch 1 | batch 64 | batch 10,000 | test accuracy |")
        print("|---|---|---|---|---|")
        for engine, call in (("torch fp32", fp32), ("torch bf16 autocast", bf16)):
            with torch.inference_mode():
                accuracy = float((call(inputs).argmax(1) == labels).float().mean())
                cells = []
                for batch in BATCHES:
                    part = inputs[:SINGLE_IMAGES] if batch == 1 else inputs
                    chunks = [part[i : i + batch] for i in range(0, len(part), batch)]

                    def run(chunks: list[torch.Tensor] = chunks, call=call) -> None:
                        for chunk in chunks:
                            call(chunk)
                        torch.cuda.synchronize(device)

                    rates = sorted(len(part) / t for t in passes(run))
                    cells.append(
                        f"{statistics.median(rates):,.0f} ({rates[0]:,.0f}-{rates[-1]:,.0f})"
                    )
            print(f"| {engine} | {' | '.join(cells)} | {accuracy:.2%} |", flush=True)
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="lenet-relu,lenet")
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"),
        help="cpu: every backend (default); cuda: PyTorch on the GPU only",
    )  # fmt: skip
    args = parser.parse_args()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                f"inference_speed: --device cuda, but torch {torch.__version__} sees no CUDA "
                "GPU here. Run it on a machine with one, with a CUDA build of torch."
            )
        gpu_main(args.models.split(","), torch.device("cuda"))
        return
    torch.set_num_threads(THREADS)
    print(f"machine: {cpu_model()}, {THREADS} cores usable, {platform.platform()}")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}, numpy {np.__version__}; torch threads {THREADS}"
    )
    print(f"command: python {' '.join(sys.argv)}\n")
    data = load_dataset("mnist")
    images = data.test.images[:, 0].numpy()
    labels = data.test.labels.numpy()
    level_all = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sequential = ort.ExecutionMode.ORT_SEQUENTIAL

    for name in args.models.split(","):
        loaded = load_weights(name)
        norm = loaded.card["normalization"]
        inputs = normalize(images, float(norm["mean"]), float(norm["std"]))
        float_model = bundled_onnx()[name].read_bytes() if name in bundled_onnx() else None
        if float_model is None:
            float_model = onnx_bytes(loaded, build_metadata(loaded, "onnx"))
        int8_model, _ = quantize_int8(
            float_model, calibration_inputs(loaded), build_metadata(loaded, "onnx")
        )
        engines = torch_engines(loaded.model, get_model_spec(name).channels_last_on_cpu)
        for threads in (1, THREADS):
            session = ort_session(float_model, threads, level_all, sequential)
            engines[f"onnxruntime float, {threads} thread(s)"] = ort_call(session)
        engines[f"onnxruntime float, {THREADS} sessions x 1 thread"] = ort_parallel(
            float_model, THREADS
        )
        # The baseline of lenet.inference_graph: the layers exported as the model lists them.
        plain_model = onnx_bytes(loaded, build_metadata(loaded, "onnx"), rearrange=False)
        for threads in (1, THREADS):
            session = ort_session(plain_model, threads, level_all, sequential)
            engines[f"onnxruntime float, layers as listed, {threads} thread(s)"] = ort_call(session)
        for threads in (1, THREADS):
            session = ort_session(int8_model, threads, level_all, sequential)
            engines[f"onnxruntime int8, {threads} thread(s)"] = ort_call(session)

        print(f"## {name} ({loaded.card.get('parameters', '?'):,} parameters)\n")
        accuracy = {}
        for engine, call in engines.items():
            out = call(inputs)
            if isinstance(out, list):
                logits = np.concatenate([np.asarray(o[0]) for o in out])
                accuracy[engine] = float((logits.argmax(1) == labels).mean())
            elif isinstance(out, torch.Tensor):
                accuracy[engine] = float((out.numpy().argmax(1) == labels).mean())
        print("| backend | batch 1 | batch 64 | batch 10,000 | one image, µs | test accuracy |")
        print("|---|---|---|---|---|---|")
        for engine, call in engines.items():
            cells = [throughput(call, inputs, b) for b in BATCHES]
            one = latency_us(call, inputs[:1].copy())
            acc = f"{accuracy[engine]:.2%}" if engine in accuracy else "(same)"
            print(f"| {engine} | {' | '.join(cells)} | {one} | {acc} |", flush=True)
        one_session = ort_session(float_model, 1, level_all, sequential)
        bound = ort_bound_one(one_session)
        expected = one_session.run(None, {one_session.get_inputs()[0].name: inputs[:1]})[0]
        assert np.array_equal(bound(inputs[:1]), expected), "IO binding gave other logits"
        spent = latency_us(bound, inputs[:1].copy())
        print(
            "\nOne image, onnxruntime float, 1 thread, through buffers bound once (IO binding; "
            f"lenet's Recognizer calls session.run as in the table): {spent} µs",
            end="",
        )
        for backend in ("onnx", "torch"):
            reader = Recognizer.load(name, backend=backend)
            one_digit = [images[0]]
            spent = latency_us(
                lambda _, r=reader, d=one_digit: r.probabilities(d), inputs[:1], 1000
            )
            print(
                f"\nRecognizer.probabilities on one 28x28 uint8 image ({backend} backend, as "
                "lenet predict and lenet serve run it: normalise, model, temperature, softmax): "
                f"{spent} µs",
                end="",
            )
        print("\n")

        print("\nonnxruntime float session settings tried (images/s; one image in µs):\n")
        print(
            "| graph optimization | execution mode | threads | batch 64 | batch 10,000 | 1 image |"
        )
        print("|---|---|---|---|---|---|")
        levels = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        modes = {"sequential": sequential, "parallel": ort.ExecutionMode.ORT_PARALLEL}
        for level_name, level in levels.items():
            for mode_name, mode in modes.items():
                for threads in (1, THREADS):
                    call = ort_call(ort_session(float_model, threads, level, mode))
                    print(
                        f"| {level_name} | {mode_name} | {threads} | "
                        f"{throughput(call, inputs, 64)} | {throughput(call, inputs, 10_000)} | "
                        f"{latency_us(call, inputs[:1].copy(), 1000)} |",
                        flush=True,
                    )
        print()


if __name__ == "__main__":
    main()
