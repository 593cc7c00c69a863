"""The training loop: whole-split tensors in memory, batches by indexing, no DataLoader.

A run folder holds ``config.json``, ``metrics.jsonl`` (one line per epoch), ``checkpoint.pt``
(rewritten atomically after every epoch and on Ctrl-C) and, at the end, ``model.safetensors``
with its model card ``model.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lenet import __version__, stages
from lenet.allocator import keep_freed_memory
from lenet.atomic import write_text_atomic
from lenet.augment import AUGMENTATIONS
from lenet.averaging import weight_average
from lenet.calibration import calibrate, uncalibrated
from lenet.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from lenet.config import RUNTIME_FIELDS, TrainConfig, reproduce_command, validate
from lenet.data import Dataset, Split, load_dataset
from lenet.device import configure_threads, resolve_device
from lenet.distributed import (
    Distributed,
    augment_seed,
    epoch_order,
    main_first,
    on_main,
    state_digest,
)
from lenet.errors import RunDirError, TrainingInterrupted
from lenet.evaluation import evaluate_model
from lenet.models import (
    LeNet,
    LeNetReLU,
    Normalization,
    TrainingView,
    count_macs,
    count_parameters,
    create_model,
    get_model_spec,
)
from lenet.sdlm import CURVATURE_IMAGES, SDLM, paper_rate
from lenet.weights import RUN_WEIGHTS_NAME, save_weights

WEIGHTS_NAME = RUN_WEIGHTS_NAME
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
CURVES_NAME = "learning_curves.png"
# TrainConfig fields that are places on the training machine, left out of model cards.
MACHINE_PATHS = ("out", "data_dir")


@dataclass
class TrainResult:
    """What a finished run produced."""

    config: TrainConfig
    run_dir: Path
    weights: Path
    epochs: int
    train_seconds: float
    samples_per_second: float
    val_accuracy: float | None  # None when trained without a validation split
    test_accuracy: float
    history: list[dict[str, Any]] = field(default_factory=list)
    card: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The JSON object `lenet train --json` prints."""
        return {
            "model": self.config.model,
            "dataset": self.config.dataset,
            "recipe": self.config.recipe,
            "epochs": self.epochs,
            "train_seconds": round(self.train_seconds, 3),
            "samples_per_second": round(self.samples_per_second, 1),
            "val_accuracy": self.val_accuracy,
            "test_accuracy": self.test_accuracy,
            "weights": str(self.weights),
            "run_dir": str(self.run_dir),
        }


def default_run_dir(config: TrainConfig) -> Path:
    """``runs/<model>-<dataset>-<local time>``: a new folder per run unless --out is given."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.model}-{config.dataset}-{stamp}"


# What a run writes into its folder (`lenet train --plots` the curves, `lenet report RUN` its
# report folder): --force clears them all, so nothing of the old run is left beside the new.
RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME, CONFIG_NAME, WEIGHTS_NAME, "model.json", CURVES_NAME)
REPORT_FOLDER = "report"


def prepare_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    """Refuse to overwrite a previous run unless told to; refuse to resume nothing."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir} is a file, not a folder: choose another --out.")
    if resume:
        if not (run_dir / CHECKPOINT_NAME).is_file():
            started = (run_dir / CONFIG_NAME).is_file()
            raise RunDirError(
                f"--resume was given, but {run_dir} holds no {CHECKPOINT_NAME}"
                + (
                    ": the run stopped before its first checkpoint, so there is nothing to "
                    "continue. Start it again with --force instead of --resume."
                    if started
                    else ". Check the --out folder, or start a new run without --resume."
                )
            )
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            ours = [name for name in RUN_FILES if (run_dir / name).exists()]
            if not ours:
                raise RunDirError(
                    f"The folder {run_dir} is not empty (it holds "
                    f"{', '.join(sorted(p.name for p in run_dir.iterdir())[:5])}, and no run): "
                    "choose another --out, or give --force to write the run among those files."
                )
            raise RunDirError(
                f"The run folder {run_dir} already holds a run. Continue it with --resume, "
                "overwrite it with --force, or choose another --out (in Python: "
                "train(config, resume=True) or force=True, or another config.out)."
            )
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        if (run_dir / REPORT_FOLDER / "report.html").is_file():
            shutil.rmtree(run_dir / REPORT_FOLDER)
    run_dir.mkdir(parents=True, exist_ok=True)


def make_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer the config names, over all of the model's parameters."""
    params = model.parameters()
    if config.optimizer == "sdlm":
        return SDLM(params, lr=config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.momentum > 0,
            weight_decay=config.weight_decay,
        )
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    params = list(params)
    try:
        # One fused kernel over every parameter instead of a dozen small operations per
        # tensor: 0.32 against 0.95 ms a step for LeNet's 10 tensors on 2 cores.
        return cls(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except RuntimeError:  # torch before 2.4 refuses fused Adam on a CPU here
        return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def _restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load a checkpoint's optimizer state into ``optimizer`` as this run set it up.

    A run may resume on another device (or torch) than the one that saved it. The
    implementation chosen here (fused or not) stays: the saved flag may name a kernel this
    device lacks. And each state tensor takes its parameter's memory layout: the fused kernel
    reads raw memory, so a GPU run's contiguous moments would be misread against a CPU run's
    channels-last weights (measured: weights off by 0.07 after one epoch).
    """
    chosen = [group.get("fused") for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, fused in zip(optimizer.param_groups, chosen):
        if "fused" in group:
            group["fused"] = fused
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if (
                    torch.is_tensor(value)
                    and value.shape == param.shape
                    and value.stride() != param.stride()
                ):
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def make_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step learning-rate schedule over the whole run (constant is a no-op schedule)."""
    total_steps = steps_per_epoch * config.epochs
    if config.schedule == "paper":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: paper_rate(step // steps_per_epoch)
        )
    if config.schedule == "onecycle":
        # A quarter of the steps warm up. PyTorch divides by the warm-up's length in steps
        # less one, so a warm-up of exactly one step (a run of 4 steps in all) raised
        # ZeroDivisionError: such a run warms up over two.
        warm_up = 0.25 if total_steps != 4 else 0.5
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=warm_up
        )
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)


def input_normalization(config: TrainConfig, data: Dataset) -> Normalization:
    """The normalisation this run trains with, and every user of its weights must apply."""
    spec = get_model_spec(config.model)
    if config.normalize and spec.normalization is not None:
        return spec.normalization
    if config.normalize and spec.standardize:
        return Normalization(data.spec.mean, data.spec.std)
    return Normalization(0.0, 1.0)


class _StopRequest:
    """Turns the first Ctrl-C (or SIGTERM: a batch system's or `docker stop`'s request to end)
    into a request to stop after the current batch.

    Stopping between batches means the checkpoint never holds a half-applied update. A second
    Ctrl-C interrupts at once, as usual (a second SIGTERM ends the process).
    """

    # Under torchrun a Ctrl-C reaches every rank, from the terminal and again from torchrun:
    # the group must finish the batch together, so there a repeat does not interrupt at once.
    restore_on_first = True

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(_signum: int, _frame: object) -> None:
            self.requested = True
            if self.restore_on_first:
                for sig, action in previous.items():
                    signal.signal(sig, action)

        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, action in previous.items():
                signal.signal(sig, action)


class _GroupStopRequest(_StopRequest):
    """A stop request that every rank sees as soon as one rank got a Ctrl-C.

    Each read of ``requested`` is a collective: the training loop reads it at the same points
    on every rank, so all ranks stop after the same batch and none waits for a peer in vain.
    """

    restore_on_first = False

    def __init__(self, distributed: Distributed) -> None:
        # Set by the signal handler only, and never cleared. A handler runs between two
        # bytecodes, typically right after the collective below returns: had the property
        # stored the collective's answer in this same flag, it would overwrite a Ctrl-C that
        # arrived during the collective, and the group would train on to the end.
        self._signalled = False
        super().__init__()
        self._group = distributed

    @property  # type: ignore[override]
    def requested(self) -> bool:
        return self._group.any(self._signalled)

    @requested.setter
    def requested(self, value: bool) -> None:
        self._signalled = self._signalled or value


class _Autocast:
    """Calls a model under bf16 autocast and hands back float32 logits for the loss."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], device_type: str) -> None:
        self.model = model
        self.device_type = device_type

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.model(x).float()


def _open_run_dir(
    config: TrainConfig, resume: bool, force: bool
) -> tuple[Path, dict[str, Any] | None]:
    run_dir = Path(config.out) if config.out else default_run_dir(config)
    prepare_run_dir(run_dir, resume, force)
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME) if resume else None
    return run_dir, checkpoint


def _rank_rng_state(checkpoint: dict[str, Any], distributed: Distributed | None) -> dict[str, Any]:
    """The RNG states this process resumes with: its own rank's where the checkpoint has them."""
    saved = checkpoint["rng"]
    if distributed is None or distributed.is_main:
        return saved
    ranks = checkpoint.get("rng_ranks") or []
    if len(ranks) == distributed.world_size:
        return ranks[distributed.rank]
    # Saved by a group of another size (or one process): this rank's stream starts afresh, so
    # the run goes on correctly but not bit for bit as it would have.
    fresh = torch.Generator().manual_seed(
        augment_seed(checkpoint["config"]["seed"], distributed.rank)
    )
    return {**saved, "data": fresh.get_state()}


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(generator: torch.Generator, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool | None = None,
    dataset: Dataset | None = None,
    on_epoch_end: Callable[[dict[str, Any], torch.nn.Module], None] | None = None,
    distributed: Distributed | None = None,
) -> TrainResult:
    """Train ``config.model`` on ``config.dataset`` and write the run folder ``config.out``.

    With ``resume``, the run continues from ``<out>/checkpoint.pt`` with the config saved
    there; only where it runs (``device``, ``threads``, ``data_dir``) is taken from ``config``.
    On the CPU it ends with exactly the weights an uninterrupted run gives.
    ``on_epoch_end(metrics, model)`` is called after each epoch (benchmarks use it) with the
    model that is validated and saved: the weights' moving average under ``config.ema``.
    With ``distributed`` (from ``lenet.distributed.init_from_environment`` under torchrun) this
    process is one rank of a DistributedDataParallel run: ``config.batch_size`` is the global
    batch, and only rank 0 writes the run folder or prints progress.
    """
    config = validate(config)
    # Before the run folder is made: a device this machine lacks leaves no empty folder behind.
    # (The device is a runtime setting: a resumed run takes it from ``config`` too.)
    device = distributed.device if distributed is not None else resolve_device(config.device)
    # Under torchrun only rank 0 touches the folder; every rank gets its checkpoint from rank 0.
    run_dir, checkpoint = on_main(distributed, lambda: _open_run_dir(config, resume, force))
    if resume:
        runtime = {k: getattr(config, k) for k in RUNTIME_FIELDS}
        config = validate(TrainConfig.from_dict({**checkpoint["config"], **runtime}))
    config = replace(config, out=str(run_dir))
    if progress is None:
        progress = sys.stderr.isatty()
    main = distributed is None or distributed.is_main
    progress = progress and main

    if config.threads is not None:
        configure_threads(config.threads)
    # Each step frees and allocates the same activations again: kept in the heap, they cost
    # no page faults (15-25% of a CPU step; lenet/allocator.py has the figures).
    keep_freed_memory()
    if dataset is None:
        dataset = main_first(
            distributed, lambda: load_dataset(config.dataset, config.data_dir, progress=progress)
        )
    data = dataset
    if not config.validation:
        # All the training images, as the 1998 paper trained: the validation split joins the
        # training split, and nothing is held out (no validation figures, no calibration).
        data = replace(
            data,
            train=Split(
                torch.cat([data.train.images, data.val.images]),
                torch.cat([data.train.labels, data.val.labels]),
            ),
        )
    if config.train_limit is not None:
        if config.train_limit > len(data.train.labels) and main:
            print(
                f"note: --train-limit {config.train_limit:,} is more than the "
                f"{len(data.train.labels):,} training images: all of them are used.",
                file=sys.stderr,
            )
        train_part = Split(
            data.train.images[: config.train_limit], data.train.labels[: config.train_limit]
        )
        data = replace(data, train=train_part)
    norm = input_normalization(config, data)
    model_spec = get_model_spec(config.model)
    memory_format = (
        torch.channels_last
        if device.type == "cpu" and model_spec.channels_last_on_cpu
        else torch.contiguous_format
    )

    # The whole training split, normalised once, on the training device.
    x_train = norm.apply(data.train.images).to(device).contiguous(memory_format=memory_format)
    y_train = data.train.labels.to(device)
    background = norm.apply(torch.zeros(1, dtype=torch.uint8)).item()
    augment = AUGMENTATIONS[config.augment]

    torch.manual_seed(config.seed)
    model = create_model(config.model).to(device).to(memory_format=memory_format)
    # Augmentation draws from this; in one process the data order too (under torchrun each
    # rank distorts its own images, and the order comes from `epoch_order`).
    rank = distributed.rank if distributed is not None else 0
    generator = torch.Generator().manual_seed(augment_seed(config.seed, rank))
    optimizer = make_optimizer(config, model)
    average = weight_average(model, config.ema) if config.ema else None
    # What is validated, tested and saved: the weights' running average, or the weights.
    final = average.module if average is not None else model
    n_train = len(y_train)
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    scheduler = make_scheduler(config, optimizer, steps_per_epoch)

    epoch, next_batch, order = 0, 0, None
    running = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
    history: list[dict[str, Any]] = []
    train_seconds = 0.0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        _restore_optimizer(optimizer, checkpoint["optimizer"])
        if average is not None:
            average.load_state_dict(checkpoint["ema"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        _set_rng_state(generator, _rank_rng_state(checkpoint, distributed))
        epoch, next_batch = checkpoint["epoch"], checkpoint["next_batch"]
        order = checkpoint.get("order")
        running = checkpoint["running"]
        if not main:  # rank 0's checkpoint holds the whole group's partial epoch sums
            running = {**running, "loss": 0.0, "correct": 0, "seen": 0}
        history = checkpoint["history"]
        train_seconds = checkpoint["train_seconds"]
        finished = epoch >= config.epochs or (history and _reached(config, history[-1]))
        if main and finished and (run_dir / WEIGHTS_NAME).is_file():
            print(
                f"note: the run in {run_dir} had already finished ({epoch} "
                f"epoch{'' if epoch == 1 else 's'}): nothing is "
                "trained; its weights are tested and saved again.",
                file=sys.stderr,
            )
    elif main:
        write_text_atomic(run_dir / CONFIG_NAME, json.dumps(config.to_dict(), indent=2) + "\n")

    def checkpoint_state() -> dict[str, Any]:
        return {
            "config": config.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": average.state_dict() if average is not None else None,
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(generator),
            "epoch": epoch,
            "next_batch": next_batch,
            "order": order,
            "running": running,
            "history": history,
            "train_seconds": train_seconds,
            "lenet_version": __version__,
            "torch_version": str(torch.__version__),  # a str subclass that safe loading refuses
        }

    def save_state() -> None:
        """Write the checkpoint (rank 0), with every rank's augmentation RNG under torchrun."""
        if distributed is None:
            save_checkpoint(run_dir / CHECKPOINT_NAME, checkpoint_state())
            return
        rng_ranks = distributed.gather(_rng_state(generator))
        group_running = distributed.sum_counts(running)
        if main:
            state = {**checkpoint_state(), "running": group_running}
            state.update(rng_ranks=rng_ranks, world_size=distributed.world_size)
            save_checkpoint(run_dir / CHECKPOINT_NAME, state)

    # What a training step calls: the model's cheaper training order (the same outputs and
    # gradients), under bf16 autocast if asked, inside DDP.
    step_model: Callable[[torch.Tensor], torch.Tensor] = TrainingView(model)
    if distributed is not None:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        step_model = DistributedDataParallel(step_model, device_ids=device_ids)
        # On a CPU, the compiled stages hand back plain-layout gradients for channels-last
        # weights: DDP copies them into its buckets (a copy of the model's 44-62k gradients a
        # step, nothing to act on) and warns once per rank that the strides differ.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
    if config.amp == "bf16":
        step_model = _Autocast(step_model, device.type)

    stop = _StopRequest() if distributed is None else _GroupStopRequest(distributed)
    reached_target = bool(history) and _reached(config, history[-1])
    warned_diverged = False
    model.train()
    with stop.installed():
        while epoch < config.epochs and not reached_target:
            started = time.perf_counter()
            if order is None and distributed is not None:
                order = epoch_order(n_train, config.seed, epoch).to(device)
            if order is None:
                order = torch.randperm(n_train, generator=generator).to(device)
            if isinstance(optimizer, SDLM) and next_batch == 0:
                # The paper's estimate before each pass, from the pass's first images as they
                # are (undistorted); a run resumed mid-pass keeps the checkpoint's.
                optimizer.estimate_curvature(model, x_train[order[:CURVATURE_IMAGES]])
            bar = tqdm(
                total=steps_per_epoch,
                initial=next_batch,
                desc=f"epoch {epoch + 1}/{config.epochs}",
                unit="batch",
                disable=not progress,
                leave=False,
                file=sys.stderr,
            )
            while next_batch < steps_per_epoch and not stop.requested:
                index = order[next_batch * config.batch_size : (next_batch + 1) * config.batch_size]
                share = 1.0  # this process's weight in the global batch's mean loss
                if distributed is not None:
                    index, share = distributed.shard(index)
                x, y = x_train[index], y_train[index]
                if augment is not None:
                    x = augment(x, generator, background)
                logits = step_model(x)
                if model_spec.loss is not None:  # the model's own loss (lenet5: eq. 9)
                    loss = model_spec.loss(logits, y)
                else:
                    loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                (loss * share).backward()
                optimizer.step()
                if average is not None:
                    average.update_parameters(model)
                scheduler.step()
                next_batch += 1
                running["loss"] += loss.item() * len(y)
                running["correct"] += int((logits.argmax(1) == y).sum())
                running["seen"] += len(y)
                bar.update(1)
                if progress and next_batch % 20 == 0:
                    elapsed = running["seconds"] + time.perf_counter() - started
                    bar.set_postfix(
                        loss=f"{running['loss'] / running['seen']:.4f}",
                        acc=f"{running['correct'] / running['seen']:.4f}",
                        samples_s=f"{running['seen'] / max(elapsed, 1e-9):,.0f}",
                    )
            bar.close()
            running["seconds"] += time.perf_counter() - started
            if stop.requested and next_batch < steps_per_epoch:
                train_seconds += time.perf_counter() - started
                save_state()
                raise _interrupted(
                    run_dir, f"in epoch {epoch + 1} at batch {next_batch}", distributed
                )

            if distributed is not None:
                running = distributed.sum_counts(running)
            # Evaluated once, on rank 0: every rank then stops (or not) on the same figure.
            # Through the training order (for lenet, its compiled stages): the same logits to
            # float32 rounding, 0.08 against 0.21 s for the 5,000 images (counted in the run's
            # training time). The test set, below, is evaluated the same way (evaluate_model).
            val = (
                on_main(
                    distributed,
                    lambda: evaluate_model(final, data.val.images, data.val.labels, norm),
                )
                if config.validation
                else None
            )
            model.train()
            epoch_seconds = running["seconds"]
            train_seconds += time.perf_counter() - started
            metrics = {
                "epoch": epoch + 1,
                "train_loss": running["loss"] / running["seen"],
                "train_accuracy": running["correct"] / running["seen"],
                "val_loss": val.loss if val is not None else None,
                "val_accuracy": val.accuracy if val is not None else None,
                "lr": optimizer.param_groups[0]["lr"],
                "epoch_seconds": round(epoch_seconds, 4),
                "samples_per_second": round(running["seen"] / max(epoch_seconds, 1e-9), 1),
                "train_seconds": round(train_seconds, 4),
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            history.append(metrics)
            epoch, next_batch, order = epoch + 1, 0, None
            running = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
            saving = time.perf_counter()
            save_state()
            if main:
                # Rewritten from the checkpoint's history, so the two never disagree after a crash.
                lines = "".join(json.dumps(h) + "\n" for h in history)
                write_text_atomic(run_dir / METRICS_NAME, lines)
            train_seconds += time.perf_counter() - saving
            if progress:
                held_out = f" val accuracy {val.accuracy:.4f}" if val is not None else ""
                print(
                    f"epoch {metrics['epoch']}/{config.epochs}: loss {metrics['train_loss']:.4f}"
                    f"{held_out} ({metrics['samples_per_second']:,.0f} samples/s)",
                    file=sys.stderr,
                )
            if main and not warned_diverged and _diverged(metrics, len(data.spec.classes)):
                warned_diverged = True
                print(_diverged_warning(config, metrics), file=sys.stderr)
            if on_epoch_end is not None:
                on_epoch_end(metrics, final)
                model.train()
            reached_target = _reached(config, metrics)
            if stop.requested and epoch < config.epochs and not reached_target:
                raise _interrupted(run_dir, f"after epoch {epoch}", distributed)

    if distributed is not None:
        distributed.share_buffers(final)
    try:
        test = on_main(
            distributed, lambda: evaluate_model(final, data.test.images, data.test.labels, norm)
        )
        # Without a validation split there is nothing unseen to fit the temperature on.
        calibration = (
            on_main(distributed, lambda: calibrate(final, data, norm))
            if config.validation
            else uncalibrated()
        )
    except KeyboardInterrupt:
        # The last epoch's checkpoint is written: resuming only tests and saves the weights.
        raise _interrupted(run_dir, "after the last epoch, while testing", distributed) from None
    classes = len(data.spec.classes)
    if main and not warned_diverged and test.accuracy < 1.5 / classes:
        print(_at_chance_note(config, test.accuracy, classes), file=sys.stderr)
    epochs_done = len(history)
    step_seconds = sum(h["epoch_seconds"] for h in history)
    card = {
        "model": config.model,
        "parameters": count_parameters(final),
        "macs_per_image": count_macs(create_model(config.model)),
        "dataset": config.dataset,
        "dataset_md5": data.md5s,
        "normalization": norm.to_dict(),
        "input": "28x28 grey, ink light on black, pixel/255 then (x - mean) / std",
        "classes": list(data.spec.classes),
        # Without the run folder and the data folder: paths on the machine that trained it
        # mean nothing where the card travels with the weights (or /v1/models shows it).
        "config": {k: v for k, v in config.to_dict().items() if k not in MACHINE_PATHS},
        "epochs_trained": epochs_done,
        "train_images": n_train,  # 55,000 with the validation split held out, else 60,000
        "val_accuracy": history[-1]["val_accuracy"] if history else None,
        "test_accuracy": test.accuracy,
        "test_error": 1.0 - test.accuracy,
        **calibration,
        "train_seconds": round(train_seconds, 3),
        "samples_per_second": round(n_train * epochs_done / max(step_seconds, 1e-9), 1),
        "device": str(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        # lenet's compiled kernels ("avx2" or "plain") where they ran: the tutorial's network's
        # two stages, lenet-relu's first convolution (lenet.stages).
        "stage_kernels": (
            stages.variant()
            if device.type == "cpu"
            and isinstance(model, (LeNet, LeNetReLU))
            and config.amp == "off"
            and stages.available()
            else None
        ),
        "torch_version": str(torch.__version__),
        "lenet_version": __version__,
        "command": reproduce_command(config),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if distributed is not None:
        # Each rank's final weights, so anyone can check that DDP kept them identical.
        card["distributed"] = {
            "world_size": distributed.world_size,
            "backend": distributed.backend,
            "global_batch_size": config.batch_size,
            "state_sha256_per_rank": distributed.broadcast(distributed.gather(state_digest(final))),
        }
    weights = run_dir / WEIGHTS_NAME
    if main:
        weights = save_weights(weights, final, card)
    if distributed is not None:
        distributed.barrier()  # no rank reports a run whose files are not yet written
    return TrainResult(
        config=config,
        run_dir=run_dir,
        weights=weights,
        epochs=epochs_done,
        train_seconds=train_seconds,
        samples_per_second=card["samples_per_second"],
        val_accuracy=card["val_accuracy"],
        test_accuracy=test.accuracy,
        history=history,
        card=card,
    )


def _interrupted(
    run_dir: Path, where: str, distributed: Distributed | None = None
) -> TrainingInterrupted:
    # Under torchrun, the same group size again: each rank resumes its own random stream.
    launcher = (
        "lenet train"
        if distributed is None
        else f"torchrun --standalone --nproc-per-node {distributed.world_size} -m lenet train"
    )
    return TrainingInterrupted(
        f"Training interrupted {where}; a checkpoint is saved in {run_dir / CHECKPOINT_NAME}. "
        f"Continue with:\n  {launcher} --resume --out {run_dir}"
    )


def _reached(config: TrainConfig, metrics: dict[str, Any]) -> bool:
    target = config.target_accuracy
    return target is not None and metrics["val_accuracy"] >= target


def _diverged(metrics: dict[str, Any], classes: int) -> bool:
    """Whether an epoch's figures say the run blew up: a loss that is not a number, or one
    above twice a uniform guess's (ln of the class count) while the answers are no better than
    chance. A run that has merely not started learning (the sigmoid network under plain SGD
    can sit at chance for epochs) keeps a loss near the uniform guess's and is not flagged."""
    loss = metrics["train_loss"]
    if math.isnan(loss) or math.isinf(loss):
        return True
    return loss > 2 * math.log(classes) and metrics["train_accuracy"] < 2 / classes


def _at_chance_note(config: TrainConfig, accuracy: float, classes: int) -> str:
    """A run that ended no better than guessing without having diverged: it has not started
    learning yet (the sigmoid network sits at chance for its first few hundred steps)."""
    more = " or on more images (a larger --train-limit)" if config.train_limit else ""
    return (
        f"note: test accuracy {accuracy:.2%} is no better than guessing one of {classes} "
        f"classes: {config.model} has not started learning in this run. Train longer (more "
        f"--epochs){more}; the weights are written all the same."
    )


def _diverged_warning(config: TrainConfig, metrics: dict[str, Any]) -> str:
    hint = ""
    if config.optimizer == "sdlm":
        hint = " (the paper recipe's 0.0004 trained lenet5 stably in batches of 32)"
    return (
        f"warning: epoch {metrics['epoch']}: training loss {metrics['train_loss']:.4g} and "
        f"accuracy {metrics['train_accuracy']:.1%}, no better than chance: the run has "
        f"diverged. Train again with a lower --lr than {config.lr:g}"
        f"{hint}; the run goes on as asked."
    )
