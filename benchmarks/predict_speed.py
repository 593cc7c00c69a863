"""Recognition speed: one user photo end to end, and throughput on the MNIST test set as files.

    python benchmarks/predict_speed.py

Prints the machine, versions, and per stage the median time for one 640x480 JPEG of a
handwritten digit on paper (decode, preprocess, model) on one thread, end to end with `lenet
predict`'s default backend and with each of torch and onnx; then one 280x280 drawing-page PNG
decoded by libspng and by Pillow (lenet/png.py), alternated; then files per second
for the 10,000 MNIST test images written as PNG files and read back with `lenet predict`'s
code path (one thread and all threads).
"""

from __future__ import annotations

import io
import itertools
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model  # noqa: E402
from PIL import Image
from serve_load import canvas_png

from lenet import png
from lenet.backends import command_line_backend
from lenet.data import load_dataset
from lenet.preprocess import find_ink, load_picture, mnist_digit, preprocess
from lenet.recognize import Recognizer


def photo(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A 640x480 JPEG of a dark digit on paper."""
    ink = np.asarray(Image.fromarray(digit).resize((220, 220), Image.Resampling.BICUBIC))
    page = 0.9 - np.linspace(0, 0.1, 640)[None, :] + rng.normal(0, 0.02, (480, 640))
    page[130:350, 200:420] -= ink / 255 * 0.7
    buffer = io.BytesIO()
    Image.fromarray(np.clip(page * 255, 0, 255).astype(np.uint8)).convert("RGB").save(
        buffer, "JPEG", quality=90
    )
    return buffer.getvalue()


def median_ms(fn, repeats: int = 200) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {platform.platform()}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    data = load_dataset("mnist")
    images, labels = data.test.images[:, 0].numpy(), data.test.labels.numpy()
    backend = command_line_backend(None, "auto")  # what `lenet predict` runs
    recognizer = Recognizer.load(backend=backend)
    print(
        f"model: bundled {recognizer.name}; `lenet predict` runs it on {recognizer.backend_name}\n"
    )

    torch.set_num_threads(1)
    jpeg = photo(images[0], np.random.default_rng(0))
    picture = load_picture(jpeg)
    found = find_ink(picture)
    digit = preprocess(jpeg)
    print("## One 640x480 JPEG, one thread (median of 200)\n")
    print("| stage | ms |\n|---|---|")
    stages = {
        "decode (JPEG to grey array)": lambda: load_picture(jpeg),
        "find ink (polarity, background, noise)": lambda: find_ink(picture),
        "MNIST construction (20x20 box, centre of mass)": lambda: mnist_digit(
            found.ink, found.mask
        ),
        "model (calibrated probabilities)": lambda: recognizer.probabilities([digit.image]),
        "**total: Recognizer.predict(bytes)**": lambda: recognizer.predict(jpeg),
    }
    # The same pipeline with the model step on each backend in turn.
    for each in ("torch", "onnx"):
        try:
            other = Recognizer.load(backend=each, threads=1)
        except Exception as exc:  # not installed, or no bundled export: say so and go on
            print(f"({each} backend not measured: {exc})\n")
            continue
        stages[f"**total with the {each} backend**"] = lambda r=other: r.predict(jpeg)
    for name, fn in stages.items():
        print(f"| {name} | {median_ms(fn):.2f} |")

    print("\n## One 280x280 drawing-page PNG (dark strokes on transparency), one thread\n")
    if not png.available():
        print("(libspng not installed: `pip install pyspng-seunglab`; Pillow decodes every PNG)")
    else:
        canvases = itertools.cycle(
            [canvas_png(images[i], np.random.default_rng(i)) for i in range(50)]
        )

        def decode_one() -> None:
            load_picture(next(canvases))

        def read_one() -> None:
            recognizer.predict(next(canvases))

        timings: dict[str, list[float]] = {}
        for _ in range(3):  # alternated: this machine's speed drifts from minute to minute
            for decoder in ("libspng", "Pillow"):
                png._spng = None if decoder == "libspng" else False
                timings.setdefault(f"decode, {decoder}", []).append(median_ms(decode_one))
                timings.setdefault(f"Recognizer.predict, {decoder}", []).append(median_ms(read_one))
        png._spng = None
        print("| stage, PNG decoder | ms (three alternated rounds) |\n|---|---|")
        for name, values in timings.items():
            print(f"| {name} | {', '.join(f'{v:.2f}' for v in values)} |")

    print("\n## The 10,000 MNIST test images as PNG files\n")
    print("| threads | files/s | accuracy |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, image in enumerate(images):
            path = Path(tmp) / f"{i:05d}.png"
            Image.fromarray(image).save(path)
            paths.append(path)
        for threads in (1, os.cpu_count() or 1):
            torch.set_num_threads(threads)  # the torch backend's threads; onnx's are below
            reader = Recognizer.load(backend=backend, threads=threads)
            started = time.perf_counter()
            answers = []
            for start in range(0, len(paths), 500):
                answers += reader.predict_batch(paths[start : start + 500])
            seconds = time.perf_counter() - started
            accuracy = np.mean([a.best_guess == y for a, y in zip(answers, labels)])
            print(f"| {threads} | {len(paths) / seconds:,.0f} | {accuracy:.2%} |")


if __name__ == "__main__":
    main()
