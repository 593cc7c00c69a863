"""How well the bundled model reads pictures like users send: the figures in the README.

    python benchmarks/recognition_accuracy.py [--weights NAME|FILE] [--per-style 500] [--lines 500]
        [--long-lines 100] [--page-photos 100] [--blank-pages 100] [--seed 100]

Pictures are built from MNIST *test* digits by tests/userstyle.py (the same generator the
tests use, with other seeds): paper photos as JPEG and PNG, canvas exports with transparency,
light chalk on a dark board, paper scans with a dark edge along one to three sides, digits in pen
on ruled or squared paper photographed a little askew, pages in poor light, digits written in a
form's boxes, bold digits cropped tightly, faint pencil, small digits in 12-megapixel photos;
lines of 2 to 6 digits and of 12 to 30; pairs of touching digits; numbers written one digit
to a box; digits typed in fonts; and pictures with no digit at all, blank pages of each style
among them.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import userstyle  # noqa: E402

from lenet.data import load_dataset  # noqa: E402
from lenet.recognize import Recognizer  # noqa: E402


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="bundled model name or .safetensors (default: best)")
    parser.add_argument("--per-style", type=int, default=500)
    parser.add_argument(
        "--lines", type=int, default=500, help="numbers, and touching pairs, to read"
    )
    parser.add_argument("--long-lines", type=int, default=100, help="lines of 12-30 digits")
    parser.add_argument(
        "--page-photos", type=int, default=100, help="small digits in 12-megapixel photos"
    )
    parser.add_argument(
        "--blank-pages", type=int, default=100, help="pictures of each style with no digit"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=100,
        help="draws the pictures (the README's figures: 100); another seed, another sample",
    )
    args = parser.parse_args()
    data = load_dataset("mnist")
    images, labels = data.test.images[:, 0].numpy(), data.test.labels.numpy()
    reader = Recognizer.load(args.weights)
    print(f"model: {reader.name}; pictures from MNIST test digits, seed {args.seed}\n")
    print("| pictures | correct | unsure | no digit found |\n|---|---|---|---|")

    def single_digits(name: str, make, count: int) -> None:
        """A row of single digits: ``count`` MNIST test digits through ``make``."""
        if not count:
            return
        rng = np.random.default_rng(args.seed)
        chosen = rng.choice(len(images), count, replace=False)
        answers = reader.predict_batch([make(images[i], rng) for i in chosen])
        correct = np.mean([a.best_guess == labels[i] for a, i in zip(answers, chosen)])
        unsure = sum(a.reason == "unsure" for a in answers)
        missing = sum(a.reason == "no digit found" for a in answers)
        print(f"| {name} | {correct:.1%} | {unsure} | {missing} |")

    for style in sorted(userstyle.STYLES):
        single_digits(f"single digit, {style}", userstyle.STYLES[style], args.per_style)
    single_digits("single digit, bold, cropped tightly", userstyle.tight, args.per_style)
    single_digits(
        "single digit in faint ink (pencil, or too little light)", userstyle.faint, args.per_style
    )
    single_digits(
        f"single digit 60-160 px tall in a 12-megapixel photo ({args.page_photos})",
        userstyle.page_photo,
        args.page_photos,
    )

    def numbers(write, rng: np.random.Generator) -> float:
        """The share of ``args.lines`` numbers of 2-6 digits, made by ``write``, read exactly."""
        exact = 0
        for _ in range(args.lines):
            chosen = rng.choice(len(images), int(rng.integers(2, 7)))
            reading = reader.read(write([images[i] for i in chosen], rng))
            exact += reading.text == "".join(str(labels[i]) for i in chosen)
        return exact / max(args.lines, 1)

    rng = np.random.default_rng(args.seed)
    exact = numbers(userstyle.number_line, rng)
    if args.lines:
        print(f"| numbers of 2-6 digits on paper, read exactly | {exact:.1%} | | |")
    exact = split = 0
    for _ in range(args.lines):
        chosen = rng.choice(len(images), 2)
        reading = reader.read(userstyle.number_line([images[i] for i in chosen], rng, True))
        split += len(reading.digits) == 2
        exact += "".join(str(d.best_guess) for d in reading.digits) == "".join(
            str(labels[i]) for i in chosen
        )
    if args.lines:
        print(
            f"| pairs of touching digits, read exactly (split in two: {split / args.lines:.1%}) "
            f"| {exact / args.lines:.1%} | | |"
        )
    exact = counted = right = total = 0
    for _ in range(args.long_lines):
        chosen = rng.choice(len(images), int(rng.integers(12, 31)))
        reading = reader.read(userstyle.number_line([images[i] for i in chosen], rng))
        exact += reading.text == "".join(str(labels[i]) for i in chosen)
        if len(reading.digits) == len(chosen):  # digit by digit where the count is right
            counted += 1
            right += sum(d.best_guess == labels[i] for d, i in zip(reading.digits, chosen))
            total += len(chosen)
    if args.long_lines:
        print(
            f"| lines of 12 to 30 digits, read exactly ({args.long_lines} lines; all digits "
            f"found in {counted / args.long_lines:.0%}, and {right / max(total, 1):.1%} of "
            f"their digits right) | {exact / args.long_lines:.1%} | | |"
        )
    exact = numbers(userstyle.boxed_number, np.random.default_rng(args.seed))
    if args.lines:
        print(f"| numbers of 2-6 digits, one to a box, read exactly | {exact:.1%} | | |")

    correct = total = 0
    for name, path in userstyle.FONTS.items():
        if path is not None and not Path(path).is_file():
            print(f"(font {name} not installed: skipped)")
            continue
        for size in (16, 28, 48, 96, 200):
            for digit in range(10):
                correct += reader.predict(userstyle.typed(digit, size, path)).best_guess == digit
                total += 1
    print(f"| typed digits, {len(userstyle.FONTS)} fonts, 16-200 px | {correct / total:.1%} | | |")

    rng = np.random.default_rng(args.seed)
    blanks = [np.full((240, 320), v, np.uint8) for v in (0, 90, 200, 255)]
    blanks += [rng.integers(0, 256, (240, 320), dtype=np.uint8) for _ in range(10)]
    blanks += [np.tile(np.linspace(40, 230, 320), (240, 1)).astype(np.uint8)]
    answered = sum(reader.predict(png(b)).digit is not None for b in blanks)
    print(f"| pictures with no digit answered with a digit | {answered} of {len(blanks)} | | |")
    # Blank pages in each style: the same pictures with no digit written on them, where
    # "no digit found" is the right answer (and "correct" the share that got it).
    nothing = np.zeros((28, 28), np.uint8)
    for style in sorted(userstyle.STYLES):
        rng = np.random.default_rng(args.seed)
        answers = reader.predict_batch(
            [userstyle.STYLES[style](nothing, rng) for _ in range(args.blank_pages)]
        )
        missing = sum(a.reason == "no digit found" for a in answers)
        unsure = sum(a.reason == "unsure" for a in answers)
        print(
            f"| blank page, {style} ({len(answers)}; no digit is right) "
            f"| {missing / max(len(answers), 1):.1%} | {unsure} | {missing} |"
        )


if __name__ == "__main__":
    main()
