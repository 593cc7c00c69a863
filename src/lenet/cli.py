"""The `lenet` command: argument parsing and output formatting only; the work is done below."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections.abc import Sequence

from lenet import __version__
from lenet.data.datasets import DATASETS
from lenet.errors import LenetError, TrainingInterrupted

DATASET_NAMES = tuple(DATASETS)


def _number(text: str) -> float:
    """``text`` as a number, or an error argparse shows as it is (its default message names
    the checking function, which means nothing to a user)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value:  # not a number, or "nan"
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _number(text)  # 4e7 and 40_000_000 as well as 40000000
    if not (1 <= value < float("inf") and value.is_integer()):
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return int(value)


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1] such as 0.99, got {text}")
    return value


def _threshold(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(
            f"must be in [0, 1] such as 0.5 (0: never unsure), got {text}"
        )
    return value


def _shown(name: str) -> str:
    """A file name as JSON can carry it: bytes that were not UTF-8 (kept by Python as lone
    surrogates, which strict JSON parsers refuse) written as \\xNN escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _mirror_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"must be an http:// or https:// URL, got {text!r}")
    return text


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=_positive_int, help="CPU threads (default: all cores), as for train"
    )


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        help="folder holding (or to receive) the dataset files; default: $LENET_DATA_DIR, "
        "else the cache (~/.cache/lenet/data)",
    )


def build_parser() -> argparse.ArgumentParser:
    from lenet.config import AMP_CHOICES, AUGMENT_CHOICES, OPTIMIZERS, RECIPES, SCHEDULES
    from lenet.device import DEVICE_CHOICES

    parser = argparse.ArgumentParser(
        prog="lenet",
        description="LeNet for handwritten digits: data, training, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"lenet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="obtain, verify and describe datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    fetch = data_commands.add_parser("fetch", help="download and verify a dataset")
    fetch.add_argument("dataset", nargs="?", default="mnist", choices=(*DATASET_NAMES, "all"))
    fetch.add_argument(
        "--mirror", action="append", default=[], metavar="URL", type=_mirror_url,
        help="a server holding <file>.gz copies, tried before the built-in sources (repeatable)",
    )  # fmt: skip
    _add_data_dir(fetch)
    info = data_commands.add_parser("info", help="where each dataset is and what it holds")
    info.add_argument("dataset", nargs="?", default="all", choices=(*DATASET_NAMES, "all"))
    info.add_argument("--json", action="store_true", help="print JSON")
    _add_data_dir(info)
    verify = data_commands.add_parser("verify", help="check the files' MD5 sums (no download)")
    verify.add_argument("dataset", nargs="?", default="mnist", choices=(*DATASET_NAMES, "all"))
    _add_data_dir(verify)

    models = commands.add_parser("models", help="list the models with parameters and MACs")
    models.add_argument("--json", action="store_true", help="print JSON")

    train = commands.add_parser(
        "train",
        help="train a model",
        description="Train a model. Options not given come from --recipe (default: 'default').",
    )
    train.add_argument("--model", help="model name (see `lenet models`; default: lenet)")
    train.add_argument("--dataset", choices=DATASET_NAMES, help="default: mnist")
    train.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        help="; ".join(f"{name}: {recipe.summary}" for name, recipe in RECIPES.items())
        + " (default: default)",
    )
    train.add_argument("--epochs", type=_positive_int)
    train.add_argument("--batch-size", type=_positive_int)
    train.add_argument("--lr", type=float, help="learning rate (peak rate for onecycle)")
    train.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help="sdlm: LeNet-5's own (1998), for lenet5 and lenet5-linear (default: adam)",
    )
    train.add_argument("--momentum", type=float, help="SGD momentum")
    train.add_argument("--weight-decay", type=float)
    train.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help="paper: the 1998 paper's rate steps per pass (default: onecycle)",
    )
    train.add_argument("--label-smoothing", type=float)
    train.add_argument(
        "--ema", type=float, metavar="DECAY",
        help="average the weights over the steps (decay per step, e.g. 0.999) and validate, "
        "test and save the average (default: 0, off)",
    )  # fmt: skip
    train.add_argument("--augment", choices=AUGMENT_CHOICES)
    train.add_argument(
        "--normalize", action=argparse.BooleanOptionalAction, default=None,
        help="standardise inputs with the dataset's mean and std (--no-normalize: pixels/255)",
    )  # fmt: skip
    train.add_argument(
        "--amp", choices=AMP_CHOICES,
        help="bf16 autocast of the forward pass (for GPUs; default: off)",
    )  # fmt: skip
    train.add_argument(
        "--train-limit", type=_positive_int, metavar="N",
        help="train on the first N training images only (quick checks; default: all)",
    )  # fmt: skip
    train.add_argument("--seed", type=int)
    train.add_argument("--device", choices=DEVICE_CHOICES)
    train.add_argument("--threads", type=_positive_int, help="CPU threads (default: all cores)")
    train.add_argument(
        "--validation", action=argparse.BooleanOptionalAction, default=None,
        help="hold out 5,000 training images for validation (the default); --no-validation "
        "trains on all 60,000, as the 1998 paper did: no validation figures, no "
        "--target-accuracy, and probabilities left uncalibrated",
    )  # fmt: skip
    train.add_argument("--target-accuracy", type=_fraction, help="stop at this val accuracy")
    train.add_argument("--out", help="run folder (default: runs/<model>-<dataset>-<time>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--force", action="store_true", help="overwrite the run in --out")
    train.add_argument("--json", action="store_true", help="print one JSON summary at the end")
    train.add_argument(
        "--plots", action="store_true",
        help="draw the learning curves into the run folder at the end (needs the plots extra)",
    )  # fmt: skip
    _add_data_dir(train)

    predict = commands.add_parser(
        "predict",
        help="read the digits in your own images",
        description="Read digits in images: files, folders (recursively) and - for stdin.",
    )
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders, or -")
    predict.add_argument(
        "--weights", help="a bundled model (lenet, lenet-relu), a .safetensors file or a run "
        "folder of `lenet train`; default: the most accurate bundled model",
    )  # fmt: skip
    predict.add_argument("--multi", action="store_true", help="read several digits in a row")
    predict.add_argument(
        "--topk",
        type=_positive_int,
        default=1,
        help="show the K likeliest digits (not with --multi)",
    )
    predict.add_argument("--json", action="store_true", help="one JSON object per input line")
    predict.add_argument(
        "--save-inputs", metavar="DIR", help="write the 28x28 image(s) the model saw as PNG"
    )
    predict.add_argument(
        "--unsure-below", type=_threshold, default=None,
        help="answer null (unsure) below this calibrated confidence (default 0.5; 0: never)",
    )  # fmt: skip
    predict.add_argument(
        "--backend", choices=("auto", "torch", "onnx"), default="auto",
        help="run the model on PyTorch or onnxruntime (a bundled name loads its bundled .onnx; "
        "--weights may be a .onnx file from `lenet export`); auto: onnxruntime when it is "
        "installed and the model has an ONNX export (the bundled ones do), else torch",
    )  # fmt: skip
    predict.add_argument(
        "--max-pixels", type=_positive_int, default=None, metavar="N",
        help="largest picture, checked before decoding (default 40,000,000; Pillow itself "
        "refuses pictures over about 179 million pixels)",
    )  # fmt: skip

    export = commands.add_parser(
        "export",
        help="write weights as ONNX or TorchScript, checked against PyTorch",
        description="Export weights to ONNX or TorchScript with a dynamic batch dimension, the "
        "model card and input contract in the file's metadata. By default the export is "
        "checked on the 10,000 MNIST test images: the same digit for every image, logits "
        "within 1e-4 of PyTorch's; a file that fails is not written.",
    )
    export.add_argument("weights", help="a bundled model name, a .safetensors file or a run folder")
    export.add_argument("--format", choices=("onnx", "torchscript"), help="default: from --out")
    export.add_argument("--out", required=True, help="the file to write (.onnx, .pt)")
    export.add_argument(
        "--int8", action="store_true",
        help="ONNX only: static int8 quantization calibrated on training images; written only "
        "if it loses at most 0.1 points of test accuracy and is faster than float",
    )  # fmt: skip
    export.add_argument("--no-check", action="store_true", help="skip the parity check")
    export.add_argument("--json", action="store_true", help="print one JSON summary")
    _add_data_dir(export)

    ensemble = commands.add_parser(
        "ensemble",
        help="combine trained weights into one ensemble (mean of calibrated probabilities)",
        description="Combine two or more trained models into one weights file that answers "
        "with the mean of their calibrated probabilities. The ensemble's temperature is fitted "
        "on the validation split; it and each member are measured on the test set. The file "
        "loads everywhere a weights file does (predict, evaluate, serve, export, Recognizer).",
    )
    ensemble.add_argument(
        "members", nargs="+", metavar="WEIGHTS",
        help="the members: .safetensors files, run folders of `lenet train`, or bundled names",
    )  # fmt: skip
    ensemble.add_argument("--out", required=True, help="the .safetensors file to write")
    ensemble.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    ensemble.add_argument("--json", action="store_true", help="print one JSON summary")
    _add_data_dir(ensemble)
    _add_threads(ensemble)

    serve = commands.add_parser(
        "serve",
        help="the HTTP API and the drawing page (needs the serve extra)",
        description="Serve the digit reader over HTTP: POST /v1/predict, POST /v1/read, "
        "POST /v1/explain, GET /v1/models, /healthz, /readyz, /metrics, the API docs at /docs "
        "and a drawing page at /.",
    )
    serve.add_argument(
        "--host", default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: all)",
    )  # fmt: skip
    serve.add_argument(
        "--port", type=int, default=8000, help="port to listen on (default 8000; 0: a free one)"
    )
    serve.add_argument(
        "--weights",
        help="a bundled model, a weights file or a run folder (default: the most accurate)",
    )
    serve.add_argument(
        "--backend", choices=("auto", "torch", "onnx"), default="auto",
        help="run the model on PyTorch or onnxruntime (default auto: onnxruntime when it is "
        "installed and the model has an ONNX export, as the bundled ones do)",
    )  # fmt: skip
    serve.add_argument(
        "--workers", type=_positive_int, default=1,
        help="HTTP worker processes (default 1; each has its own readers)",
    )  # fmt: skip
    serve.add_argument(
        "--reading", choices=("processes", "threads"), default="processes",
        help="read pictures in processes of their own (default: about twice the requests a "
        "second on two cores; Linux and macOS, threads on Windows) or in threads of the "
        "server (one model in memory, no start-up)",
    )  # fmt: skip
    serve.add_argument(
        "--readers", type=_positive_int, default=None, metavar="N",
        help="reading processes or threads per worker (default: the cores this process may "
        "use, CPU quotas included, divided among the workers; at most 4)",
    )  # fmt: skip
    serve.add_argument(
        "--max-upload", type=_positive_int, default=5 * 1024 * 1024, metavar="BYTES",
        help="largest accepted request body (default 5 MB)",
    )  # fmt: skip
    serve.add_argument(
        "--max-pixels", type=_positive_int, default=None, metavar="N",
        help="largest picture, checked before decoding (default 40,000,000; Pillow itself "
        "refuses pictures over about 179 million pixels)",
    )  # fmt: skip
    serve.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS",
        help="answer 503 to a request not answered within this, and 408 to an upload that "
        "stops arriving for this long (default 10)",
    )  # fmt: skip
    serve.add_argument("--access-log", action="store_true", help="log every request")

    evaluate = commands.add_parser("evaluate", help="measure trained weights on a split")
    evaluate.add_argument(
        "weights",
        help="a .safetensors file with its .json model card, a run folder of `lenet train`, "
        "or a bundled model name",
    )
    evaluate.add_argument(
        "--dataset",
        choices=DATASET_NAMES,
        help="the card's (the default; another is refused: the model's outputs are its classes)",
    )
    evaluate.add_argument("--split", default="test", choices=("test", "val", "train"))
    evaluate.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    evaluate.add_argument("--json", action="store_true", help="print JSON")
    evaluate.add_argument(
        "--plots", metavar="DIR", help="also draw the confusion matrix, accuracy per class, "
        "worst errors and reliability diagram into DIR (needs the plots extra)",
    )  # fmt: skip
    _add_data_dir(evaluate)
    _add_threads(evaluate)

    report = commands.add_parser(
        "report",
        help="figures and one self-contained HTML page about a run or weights",
        description="Evaluate a run (or weights) and write PNG figures and report.html: learning "
        "curves, confusion matrix, accuracy per class, worst errors, calibration, model card.",
    )
    report.add_argument(
        "source", metavar="RUN_DIR_OR_WEIGHTS",
        help="a run folder, a .safetensors file, or a bundled model name",
    )  # fmt: skip
    report.add_argument(
        "--out", help="folder for the report (default: RUN_DIR/report, else ./report-NAME)"
    )
    report.add_argument("--split", default="test", choices=("test", "val", "train"))
    report.add_argument(
        "--dataset",
        choices=DATASET_NAMES,
        help="the card's (the default; another is refused: the model's outputs are its classes)",
    )
    report.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    _add_data_dir(report)
    _add_threads(report)

    explain = commands.add_parser(
        "explain",
        help="what the network sees in one image: filters, feature maps, saliency",
        description="Draw, for one image, the 28x28 the model sees, the first-layer filters, "
        "the maps after each convolution and pooling, and a saliency map.",
    )
    explain.add_argument("image", metavar="IMAGE", help="a picture of one digit")
    explain.add_argument(
        "--weights",
        help="a bundled model, a .safetensors file or a run folder (default: the most accurate)",
    )
    explain.add_argument("--out", metavar="FILE.png", help="default: explain-<image name>.png")
    explain.add_argument(
        "--json", action="store_true", help="print the numbers (maps as base64 PNGs) as JSON"
    )
    return parser


def _datasets(choice: str) -> tuple[str, ...]:
    return DATASET_NAMES if choice == "all" else (choice,)


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from lenet.data import fetch
    from lenet.data.sources import HttpMirror

    mirrors = [HttpMirror(url) for url in args.mirror]
    for name in _datasets(args.dataset):
        report = fetch(name, args.data_dir, progress=sys.stderr.isatty(), extra_sources=mirrors)
        print(f"{name}: verified in {', '.join(str(f) for f in report.folders)}")
        for file, origin in report.origin.items():
            print(f"  {file}: {origin}")
        for problem in report.passed_over:
            print(f"  note: passed over {problem}")
    return 0


def cmd_data_verify(args: argparse.Namespace) -> int:
    from lenet.data import verify

    bad = damaged = 0
    for name in _datasets(args.dataset):
        for status in verify(name, args.data_dir):
            if status.ok:
                print(f"ok      {name}/{status.name}: {status.path}")
                for problem in status.passed_over:
                    print(f"        note: passed over {problem}")
            else:
                mark = "missing" if status.missing else "BAD    "
                print(f"{mark} {name}/{status.name}: {status.detail}")
            bad += not status.ok
            damaged += bool(status.ok and status.passed_over)
    if bad:
        print(f"{bad} file(s) missing or damaged: `lenet data fetch {args.dataset}` repairs them.")
    if damaged:
        # The data is usable, but a folder the user keeps holds damaged copies: said in the
        # exit status too, for scripts that check a folder they maintain.
        print(
            f"{damaged} damaged copy(ies) passed over (a verified copy is used instead): "
            "delete them."
        )
    return 1 if bad or damaged else 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from lenet.data.datasets import describe

    infos = [describe(name, args.data_dir) for name in _datasets(args.dataset)]
    if args.json:
        print(json.dumps(infos if len(infos) > 1 else infos[0], indent=2))
        return 0
    for info in infos:
        state = "verified" if info["verified"] else "not fetched or damaged"
        print(f"{info['dataset']}: {info['title']}\n  folder: {info['folder']} ({state})")
        for file, status in info["files"].items():
            for problem in status["passed_over"]:
                print(f"  note: {file}: passed over {problem}")
        if not info["verified"]:
            print(f"  get it with: lenet data fetch {info['dataset']}")
            continue
        for split, s in info["splits"].items():
            counts = " ".join(str(c) for c in s["class_counts"])
            print(
                f"  {split:5} {s['images']:6,} images  mean {s['pixel_mean']:.4f} "
                f"std {s['pixel_std']:.4f}  per class: {counts}"
            )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from lenet.models import MODELS, count_macs, count_parameters

    rows = []
    for name, spec in MODELS.items():
        model = spec.build()
        rows.append(
            {
                "name": name,
                "parameters": count_parameters(model),
                "macs": count_macs(model),
                "summary": spec.summary,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len("model"), *(len(row["name"]) for row in rows))
    print(f"{'model':{width}} {'parameters':>10} {'MACs/image':>11}  description")
    for row in rows:
        line = f"{row['name']:{width}} {row['parameters']:>10,} {row['macs']:>11,}"
        print(f"{line}  {row['summary']}")
    return 0


_RUNTIME_OPTIONS = ("device", "threads", "data_dir", "out", "resume", "force", "json", "plots")


def _saved_run_config(run_dir: str) -> dict | None:
    """The settings a run folder's run was started with (its config.json), if readable."""
    from pathlib import Path

    from lenet.training import CONFIG_NAME

    try:
        saved = json.loads((Path(run_dir) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def cmd_train(args: argparse.Namespace) -> int:
    from lenet.config import resolve_config
    from lenet.training import train

    if args.resume:
        if not args.out:
            raise LenetError("--resume needs --out: the folder of the run to continue.")
        # The run's own command with --resume added works: options equal to the run's
        # settings pass, and only a change is refused.
        saved = _saved_run_config(args.out)
        changed = [
            "--" + key.replace("_", "-")
            for key, value in vars(args).items()
            if value is not None
            and key not in (*_RUNTIME_OPTIONS, "command")
            and (saved is None or saved.get(key) != value)
        ]
        if changed:
            raise LenetError(
                f"--resume continues a run with the settings it was started with; "
                f"{', '.join(changed)} cannot change. Only --device, --threads, --data-dir, "
                "--json and --plots may differ with --resume (or start a new run without it)."
            )
    config = resolve_config(
        args.model or "lenet",
        args.recipe or "default",
        dataset=args.dataset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        label_smoothing=args.label_smoothing,
        ema=args.ema,
        augment=args.augment,
        normalize=args.normalize,
        amp=args.amp,
        train_limit=args.train_limit,
        validation=args.validation,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        target_accuracy=args.target_accuracy,
        data_dir=args.data_dir,
        out=args.out,
    )
    if args.momentum is not None and config.optimizer != "sgd":
        raise LenetError(
            f"--momentum is for --optimizer sgd; {config.optimizer} keeps its own running "
            "averages (its betas) and ignores it. Leave --momentum out, or add --optimizer sgd."
        )
    if args.resume and args.force:
        raise LenetError("--resume and --force contradict each other: choose one.")
    if args.plots:
        from lenet import plots

        plots.require_matplotlib()  # now, not after the training it would draw
    from lenet.distributed import init_from_environment

    # Under torchrun: join the group once, here; the training loop gets it (and the device).
    distributed = init_from_environment(config.device)
    try:
        result = train(config, resume=args.resume, force=args.force, distributed=distributed)
    except TrainingInterrupted:
        if distributed is not None and not distributed.is_main:
            return 130  # rank 0 says where the checkpoint is; one message is enough
        raise
    finally:
        if distributed is not None:
            distributed.close()
    if distributed is not None and not distributed.is_main:
        return 0  # rank 0 reports the run
    curves = None
    if args.plots:
        from lenet.training import CURVES_NAME

        title = f"Learning curves: {result.config.model}, {result.run_dir.name}"
        curves = plots.learning_curves(result.history, result.run_dir / CURVES_NAME, title)
    if args.json:
        summary = result.summary()
        if curves is not None:
            summary["learning_curves"] = str(curves)
        print(json.dumps(summary))
    else:
        held_out = (
            f"validation {result.val_accuracy:.2%}"
            if result.val_accuracy is not None
            else "no validation split held out"
        )
        epochs = f"{result.epochs} epoch(s)"
        target = result.config.target_accuracy
        if target is not None and result.epochs < result.config.epochs:
            # Stopped early: say why, or the fewer epochs look like a run cut short.
            epochs = (
                f"{result.epochs} of {result.config.epochs} epochs (target {target:.2%} reached)"
            )
        print(
            f"{result.config.model} on {result.config.dataset}: test accuracy "
            f"{result.test_accuracy:.2%} ({held_out}) after {epochs}, "
            f"{result.train_seconds:.1f} s of training "
            f"({result.samples_per_second:,.0f} samples/s)\n"
            f"weights: {result.weights} (model card beside it)\n"
            f"evaluate again with: lenet evaluate {shlex.quote(str(result.weights))}"
        )
        if curves is not None:
            print(f"learning curves: {curves}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lenet.evaluation import evaluate

    figures: dict[str, object] = {}
    if args.plots:
        from lenet import plots
        from lenet.report import evaluate_split, evaluation_figures

        plots.require_matplotlib()
        evaluation = evaluate_split(
            args.weights, args.dataset, args.split, args.data_dir, args.device
        )
        result = evaluation.result
        figures = {k: str(v) for k, v in evaluation_figures(evaluation, args.plots).items()}
    else:
        result = evaluate(args.weights, args.dataset, args.split, args.data_dir, args.device)
    if args.json:
        extra = {"figures": figures} if figures else {}
        print(json.dumps({"weights": args.weights, **result.to_dict(), **extra}))
        return 0
    print(
        f"{result.model} on {result.dataset} {result.split}: accuracy {result.accuracy:.2%} "
        f"(error {1 - result.accuracy:.2%}), loss {result.loss:.4f}, "
        f"{result.count:,} images in {result.seconds:.2f} s\n"
    )
    if result.trained_on:
        which = (
            f"these {result.count:,} images"
            if result.trained_on_images == result.count
            else f"the first {result.trained_on_images:,} of these images (--train-limit)"
        )
        print(
            f"note: the model was trained on {which}: this says how well it fits them, not "
            "how well it reads digits it has not seen (use --split test).\n"
        )
    print(f"{'class':>12} {'precision':>9} {'recall':>7} {'f1':>7}")
    for name, p, r, f in zip(result.classes, result.precision, result.recall, result.f1):
        print(f"{name:>12} {p:9.4f} {r:7.4f} {f:7.4f}")
    print("\nconfusion matrix (rows: true class, columns: predicted)")
    print("     " + "".join(f"{j:>6}" for j in range(len(result.classes))))
    for i, row in enumerate(result.confusion.tolist()):
        print(f"{i:>4} " + "".join(f"{v:>6}" for v in row))
    if figures:
        print("\nfigures:\n" + "\n".join(f"  {path}" for path in figures.values()))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from lenet.report import build_report

    report = build_report(
        args.source, args.out, split=args.split, dataset=args.dataset,
        data_dir=args.data_dir, device=args.device,
    )  # fmt: skip
    r = report.evaluation.result
    print(f"{r.model} on {r.dataset} {r.split}: accuracy {r.accuracy:.2%} on {r.count:,} images")
    if report.source.history is None:
        print(f"no learning curves: {report.source.why_no_curves}")
    for path in report.figures.values():
        print(f"figure: {path}")
    print(f"report: {report.html} (self-contained: open it in any browser, offline)")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lenet import plots
    from lenet.explain import explain

    if args.out is not None and Path(args.out).suffix.lower() != ".png":
        raise LenetError(f"--out {args.out}: the explanation is a PNG picture; name it .png.")
    if not args.json:
        plots.require_matplotlib()
    explained = explain(args.image, args.weights)
    if args.json:
        print(json.dumps({"file": args.image, **explained.to_dict()}))
        if args.out is None:
            return 0
    out = Path(args.out) if args.out else Path(f"explain-{Path(args.image).stem}.png")
    plots.explanation(explained, out)
    if not args.json:
        print(
            f"{args.image}: {explained.digit} ({explained.confidence:.1%} calibrated "
            f"confidence, model {explained.model})\nexplanation: {out}"
        )
    return 0


def _expand(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """Files as given, folders as the image files inside them (recursively, sorted); and the
    folders that held none."""
    from pathlib import Path

    out, empty = [], []
    for path in paths:
        if path != "-" and Path(path).is_dir():
            found = _images_in(path)
            out += found
            if not found:
                empty.append(path)
        else:
            out.append(path)
    return out, empty


def _images_in(folder: str) -> list[str]:
    """The image files in ``folder`` and the folders below it, sorted. Linked folders are
    followed (each real folder once, so a link to a parent ends); hidden files and folders
    (a name starting with a dot: macOS's ._ copies, .git) are passed over, as is a folder
    whose name ends like an image's."""
    import os

    from lenet.preprocess import IMAGE_SUFFIXES

    found, seen = [], set()
    for top, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in files:
            path = os.path.join(top, name)
            if (
                not name.startswith(".")
                and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
                and (os.path.isfile(path) or os.path.islink(path))  # a broken link is said
            ):
                found.append(path)
    return sorted(found)


def cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from lenet.backends import command_line_backend
    from lenet.errors import ImageError
    from lenet.recognize import NO_DIGIT, UNSURE_BELOW, Recognizer

    # The options are checked before the model is loaded, and the folder for --save-inputs
    # made: a mistake in them is reported before any picture is read.
    if args.multi and args.topk > 1:
        raise LenetError("--topk is for one digit a picture: leave it out with --multi.")
    save = Path(args.save_inputs) if args.save_inputs else None
    if save is not None:
        if save.exists() and not save.is_dir():
            raise LenetError(f"--save-inputs {save} is a file: give a folder (made if missing).")
        try:
            save.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LenetError(f"--save-inputs {save}: the folder cannot be made ({exc}).") from None
    recognizer = Recognizer.load(
        args.weights,
        unsure_below=UNSURE_BELOW if args.unsure_below is None else args.unsure_below,
        backend=command_line_backend(args.weights, args.backend),
    )
    if args.max_pixels:
        recognizer.max_pixels = args.max_pixels
    files, empty = _expand(args.paths)
    if empty:
        from lenet.preprocess import IMAGE_SUFFIXES

        kinds = ", ".join(IMAGE_SUFFIXES)
        folders = ", ".join(empty)
        if not files:
            raise LenetError(f"No image files ({kinds}) in {folders}: nothing to read.")
        # The other inputs are still answered; the empty folder is said, not hidden.
        print(f"lenet predict: no image files ({kinds}) in {folders}", file=sys.stderr)
    if files.count("-") > 1:
        raise LenetError("- (standard input) can be read once: give it once.")
    failed = 0
    if not args.json:
        header = "text" if args.multi else "digit  confidence"
        print(f"{header:<18} file")
    for index, name in enumerate(files):
        source = sys.stdin.buffer.read() if name == "-" else name
        try:
            if args.multi:
                reading = recognizer.read(source)
                answers, result = reading.digits, reading.to_dict()
            else:
                answers = [recognizer.predict(source)]
                result = answers[0].to_dict()
        except Exception as exc:  # one picture's failure must not stop the others
            failed += 1
            message = str(exc) if isinstance(exc, ImageError) else f"unexpected error: {exc!r}"
            if args.json:
                print(json.dumps({"file": _shown(name), "error": message}), flush=True)
            else:
                # Messages about a file often begin with its path already (as Path prints it).
                named = message.startswith((f"{Path(name)}:", f"{Path(name)} "))
                where = "" if named else f"{name}: "
                print(f"{'error':<18} {where}{message}", flush=True)
            continue
        if save is not None:
            stem = f"{index:04d}-{Path(name).stem if name != '-' else 'stdin'}"
            for k, answer in enumerate(answers):
                if answer.image is not None:
                    suffix = f"-{k}" if args.multi else ""
                    Image.fromarray(answer.image).save(save / f"{stem}{suffix}.png")
        if args.json:
            if args.topk > 1 and not args.multi:
                probabilities = answers[0].probabilities
                # No digit, no ranking (its probabilities are ten zeros).
                found = answers[0].reason != NO_DIGIT
                order = np.argsort(probabilities)[::-1][: args.topk] if found else []
                result["top"] = [
                    {"digit": int(k), "probability": round(probabilities[k], 6)} for k in order
                ]
            print(json.dumps({"file": _shown(name), **result}), flush=True)
        elif args.multi:
            text = result["text"] if result["text"] is not None else "?"
            detail = " ".join(
                f"{d.best_guess}({d.confidence:.2f})" for d in answers if d.best_guess is not None
            )
            print(f"{text:<18} {name}  [{detail}]", flush=True)
        else:
            answer = answers[0]
            if answer.reason == NO_DIGIT:
                print(f"{'-':<5}  {'no digit':<10} {name}", flush=True)
                continue
            shown = str(answer.digit) if answer.digit is not None else f"?{answer.best_guess}"
            line = f"{shown:<5}  {answer.confidence:<10.4f} {name}"
            if args.topk > 1:
                order = np.argsort(answer.probabilities)[::-1][: args.topk]
                line += "  top: " + ", ".join(f"{k}:{answer.probabilities[k]:.3f}" for k in order)
            if answer.others:
                many = "digits" if answer.others > 1 else "digit"
                line += f"  ({answer.others} more {many} beside it: --multi reads them all)"
            print(line, flush=True)
    return 1 if failed else 0


def _check_can_listen(host: str, port: int) -> None:
    """Refuse a port or host this process cannot listen on with what to do, rather than
    uvicorn's bare "[Errno 98] address already in use" after start-up. (Port 0, any free one,
    is probed too: the host may still be wrong.)"""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise LenetError(
            f"--host {host} is not a name or address this machine knows ({exc})."
        ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise LenetError(
                    f"--host {host} is not an address of this machine: give one it has, such "
                    "as 127.0.0.1 (this machine only) or 0.0.0.0 (every network it is on)."
                ) from None
            reason = {
                errno.EADDRINUSE: "is in use (another lenet serve, or another server?)",
                errno.EACCES: "needs more privileges than this user has (ports under 1024)",
            }.get(exc.errno or 0, f"cannot be listened on ({exc.strerror})")
            raise LenetError(
                f"Port {port} on {host} {reason}: choose another with --port N, or --port 0 "
                "for a free one."
            ) from None


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from lenet.server import ServeSettings
        from lenet.server.app import default_readers, serving_backend
        from lenet.server.runner import run
    except ImportError as exc:
        raise LenetError(
            f"lenet serve needs the serve extra ({exc.name} is missing): "
            "pip install 'lenet[serve]'."
        ) from None
    if not 0 <= args.port <= 65535:
        raise LenetError(f"--port {args.port} is not a port number (0-65535).")
    if args.port == 0 and args.workers > 1:
        # Each worker would announce port 0: uvicorn binds the port before they start.
        raise LenetError("--port 0 (a free port) works with one worker: give a port number.")
    if not math.isfinite(args.timeout) or args.timeout <= 0:
        raise LenetError(f"--timeout must be a positive number of seconds, not {args.timeout}.")
    from lenet.recognize import Recognizer

    # Loaded here, so that a wrong --weights or --backend is reported before serving.
    settings = ServeSettings(weights=args.weights, backend=args.backend)
    recognizer = Recognizer.load(args.weights, backend=serving_backend(settings))
    _check_can_listen(args.host, args.port)
    settings = ServeSettings(
        weights=args.weights,
        backend=recognizer.backend_name,
        host=args.host,
        port=args.port,
        max_upload_bytes=args.max_upload,
        timeout_s=args.timeout,
        reading=args.reading,
        readers=args.readers or default_readers(args.workers),
        **({"max_pixels": args.max_pixels} if args.max_pixels else {}),
    )
    run(settings, recognizer, args.workers, args.access_log)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lenet.export import export

    result = export(
        args.weights, args.out, args.format, args.int8, not args.no_check, args.data_dir
    )
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    kind = f"{result.format} (int8)" if args.int8 else result.format
    print(f"{result.model} -> {result.path}: {kind}, {result.bytes:,} bytes, {result.seconds:.1f}s")
    parity = result.parity
    if parity is None:
        print("not checked (--no-check)")
    elif parity.tolerance is None:
        print(
            f"test accuracy {parity.accuracy_exported:.2%} (float {parity.accuracy_torch:.2%}); "
            f"same digit as float on {parity.same_digit:,} of {parity.images:,} test images; "
            f"max logit difference {parity.max_abs_diff:.3g}"
        )
    else:
        print(
            f"parity with PyTorch on {parity.images:,} test images: the same digit for all, "
            f"max logit difference {parity.max_abs_diff:.2e} (allowed {parity.tolerance:.0e}); "
            f"test accuracy {parity.accuracy_exported:.2%}"
        )
    if result.int8_speed is not None:
        speed = result.int8_speed
        print(
            f"speed (one thread): int8 {speed.int8_images_per_s:,.0f} images/s, "
            f"float {speed.float_images_per_s:,.0f} images/s"
        )
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from lenet.ensemble import build_ensemble

    result = build_ensemble(args.members, args.out, args.data_dir, args.device)
    if args.json:
        print(json.dumps(result.summary()))
        return 0
    for member in result.card["members"]:
        print(f"member {member['weights']} ({member['model']}): test accuracy "
              f"{member['test_accuracy']:.2%}")  # fmt: skip
    print(
        f"ensemble of {len(result.card['members'])}: test accuracy {result.test_accuracy:.2%} "
        f"(error {1 - result.test_accuracy:.2%}), validation {result.card['val_accuracy']:.2%}\n"
        f"weights: {result.path} (model card beside it)\n"
        f"use it with: lenet predict IMAGE --weights {shlex.quote(str(result.path))}"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    """The subcommand ``args`` names; its exit status."""
    if args.command == "data":
        handler = {"fetch": cmd_data_fetch, "info": cmd_data_info, "verify": cmd_data_verify}
        return handler[args.data_command](args)
    commands = {
        "models": cmd_models,
        "train": cmd_train,
        "evaluate": cmd_evaluate,
        "predict": cmd_predict,
        "export": cmd_export,
        "ensemble": cmd_ensemble,
        "report": cmd_report,
        "explain": cmd_explain,
        "serve": cmd_serve,
    }
    if getattr(args, "threads", None) and args.command != "train":  # train sets its own
        from lenet.device import configure_threads

        configure_threads(args.threads)
    return commands[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `lenet` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        status = _run(args)
        # Output to a pipe is buffered: written here, where a reader gone away is handled,
        # rather than when Python exits.
        sys.stdout.flush()
        return status
    except TrainingInterrupted as exc:
        print(f"lenet: {exc}", file=sys.stderr)
        return 130
    except LenetError as exc:
        print(f"lenet: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lenet: interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`lenet evaluate --json | head -c 10`): stop quietly, as other
        # commands do, and keep Python from complaining again when it flushes at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # the shell's status for a process ended by SIGPIPE
    except OSError as exc:
        # A file system or network problem no layer below anticipated: say what it was, and
        # for the usual ones what to do.
        import errno

        advice = {
            errno.EEXIST: " A file is where a folder is needed: give another path.",
            errno.ENOTDIR: " Part of the path is a file, not a folder: give another path.",
            errno.EISDIR: " That is a folder: give a file's path.",
            errno.EACCES: " This user may not write there: choose a folder you own.",
            errno.EROFS: " That file system is read-only: choose another folder.",
            errno.ENOSPC: " The disk is full: free some space or choose another disk.",
        }.get(exc.errno or 0, "")
        print(
            f"lenet: {exc.strerror or exc} ({exc.filename or 'no file name'}).{advice}",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
