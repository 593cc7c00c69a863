"""Training on real MNIST: learning, resuming exactly, the run folder, the CLI end to end."""

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lenet.checkpoint import CHECKPOINT_NAME
from lenet.config import resolve_config
from lenet.errors import RunDirError, WeightsError
from lenet.evaluation import evaluate, evaluate_model
from lenet.models import MODELS
from lenet.training import TrainingInterrupted, train
from lenet.weights import load_weights


def test_a_short_run_learns_and_writes_a_complete_run_folder(small_mnist, tmp_path):
    config = resolve_config("lenet-relu", epochs=1, out=str(tmp_path / "run"))
    result = train(config, dataset=small_mnist, progress=False)
    assert result.val_accuracy > 0.90
    run = tmp_path / "run"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["val_accuracy"] == result.val_accuracy
    card = json.loads((run / "model.json").read_text())
    for key in ("model", "parameters", "dataset_md5", "config", "val_accuracy", "test_accuracy",
                "train_seconds", "samples_per_second", "torch_version", "command"):  # fmt: skip
        assert key in card
    assert card["command"].startswith("lenet train --model lenet-relu")
    # The card travels with the weights: no folder of this machine in it.
    assert str(tmp_path) not in json.dumps(card)
    assert card["config"]["epochs"] == 1 and "out" not in card["config"]
    # The weights reproduce the card's test accuracy exactly.
    loaded = load_weights(result.weights)
    again = evaluate_model(
        loaded.model, small_mnist.test.images, small_mnist.test.labels, loaded.normalization
    )
    assert again.accuracy == card["test_accuracy"]
    # Validation runs the training order (compiled stages); it gives `forward`'s figure.
    val = evaluate_model(
        loaded.model, small_mnist.val.images, small_mnist.val.labels, loaded.normalization
    )
    assert val.accuracy == result.val_accuracy
    # Checkpoints load in PyTorch's safe mode.
    state = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    assert state["epoch"] == 1


def test_without_validation_the_held_out_images_are_trained_on(small_mnist, tmp_path):
    config = resolve_config("mlp", epochs=1, validation=False, out=str(tmp_path / "run"))
    result = train(config, dataset=small_mnist, progress=False)
    assert result.card["train_images"] == len(small_mnist.train.labels) + len(
        small_mnist.val.labels
    )
    # Nothing was held out: no validation figures and no temperature fitted on seen images.
    assert result.val_accuracy is None and result.history[0]["val_accuracy"] is None
    assert result.card["temperature"] is None and load_weights(result.weights).temperature == 1
    assert result.test_accuracy > 0.85
    assert "--no-validation" in result.card["command"]
    # Evaluating on the images it was trained on says so (`lenet evaluate` prints a note).
    assert evaluate(result.weights, split="val").trained_on
    assert not evaluate(result.weights, split="test").trained_on
    # With --train-limit, only the first N images were seen: on a 60,000-image split,
    # --no-validation and a limit under 55,000 leave the validation images unseen.
    from lenet.evaluation import images_trained_on

    card = {"config": {"validation": False, "train_limit": 1000}}
    assert images_trained_on(card, "train", 55_000) == 1000
    assert images_trained_on(card, "val", 5000) == 0
    card["config"]["train_limit"] = 57_000
    assert images_trained_on(card, "val", 5000) == 2000
    card["config"]["validation"] = True
    assert images_trained_on(card, "val", 5000) == 0
    assert images_trained_on(card, "test", 10_000) == 0
    held_out = train(
        resolve_config("mlp", epochs=1, out=str(tmp_path / "held-out")),
        dataset=small_mnist,
        progress=False,
    )
    assert held_out.card["train_images"] == len(small_mnist.train.labels)
    assert held_out.card["temperature"] is not None


STEPS_PER_EPOCH = 12_000 // 256 + 1  # small_mnist with batch 256


# The last case also keeps a weight average (--ema), which the checkpoint must carry.
@pytest.mark.parametrize(
    ("at_step", "ema"),
    [(STEPS_PER_EPOCH, 0.0), (STEPS_PER_EPOCH + 20, 0.0), (STEPS_PER_EPOCH + 20, 0.99)],
)
def test_resume_after_ctrl_c_gives_the_uninterrupted_weights(
    small_mnist, tmp_path, monkeypatch, at_step, ema
):
    common = dict(epochs=3, batch_size=256, augment="affine", seed=3, threads=2, ema=ema)
    straight = train(
        resolve_config("lenet-relu", out=str(tmp_path / "a"), **common), dataset=small_mnist
    )
    config = resolve_config("lenet-relu", out=str(tmp_path / "b"), **common)
    # A real SIGINT, delivered during optimizer step number `at_step`, as a Ctrl-C would be.
    real_step, calls = torch.optim.Adam.step, []

    def step_then_ctrl_c(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == at_step:
            signal.raise_signal(signal.SIGINT)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step_then_ctrl_c)
    with pytest.raises(TrainingInterrupted, match="lenet train --resume --out"):
        train(config, dataset=small_mnist)
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    saved = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)
    # The batch in flight is finished, then the run stops.
    assert (saved["epoch"], saved["next_batch"]) == divmod(at_step, STEPS_PER_EPOCH)
    resumed = train(config, resume=True, dataset=small_mnist)
    a, b = load_file(straight.weights), load_file(resumed.weights)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.test_accuracy == straight.test_accuracy
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 3


def test_an_existing_run_is_not_overwritten(small_mnist, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"precious")
    with pytest.raises(RunDirError, match="--resume.*--force"):
        train(resolve_config("lenet", out=str(run)), dataset=small_mnist)
    assert (run / "model.safetensors").read_bytes() == b"precious"


def test_resuming_in_another_memory_layout_continues_the_same_run(
    small_mnist, tmp_path, monkeypatch
):
    # A GPU run keeps contiguous weights and optimizer moments; on a CPU lenet-relu's weights
    # are channels-last. Resumed on the CPU, the moments must be read in the weights' layout
    # (the fused Adam kernel reads raw memory: the same numbers in another order otherwise).
    config = resolve_config("lenet-relu", epochs=2, train_limit=3072, threads=1)
    as_on_gpu = dataclasses.replace(MODELS["lenet-relu"], channels_last_on_cpu=False)

    class Stop(Exception):
        pass

    def stop_after_first_epoch(metrics, _model):
        raise Stop

    with monkeypatch.context() as patch:
        patch.setitem(MODELS, "lenet-relu", as_on_gpu)
        with pytest.raises(Stop):
            train(
                dataclasses.replace(config, out=str(tmp_path / "a")),
                dataset=small_mnist,
                progress=False,
                on_epoch_end=stop_after_first_epoch,
            )
        shutil.copytree(tmp_path / "a", tmp_path / "b")
        same_layout = train(
            dataclasses.replace(config, out=str(tmp_path / "b")),
            resume=True,
            dataset=small_mnist,
            progress=False,
        )
    channels_last = train(
        dataclasses.replace(config, out=str(tmp_path / "a")),
        resume=True,
        dataset=small_mnist,
        progress=False,
    )
    expected = load_file(same_layout.weights)
    got = load_file(channels_last.weights)
    for name, tensor in expected.items():
        # The layouts' kernels round differently (BatchNorm of 16 maps runs channels-last in
        # one), and a dozen Adam steps amplify that to 1.4e-4 to 2.1e-3 of a tensor's largest
        # weight (measured, as the kernels changed); moments read in the wrong order moved
        # weights by 0.07, 0.3 of the largest.
        scale = float(tensor.abs().max()) if tensor.is_floating_point() else 0.0
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-2 * scale, msg=name)


def test_resume_without_a_checkpoint_or_with_a_damaged_one(small_mnist, tmp_path):
    config = resolve_config("lenet", out=str(tmp_path / "run"))
    with pytest.raises(RunDirError, match="holds no checkpoint.pt"):
        train(config, resume=True, dataset=small_mnist)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / CHECKPOINT_NAME).write_bytes(b"garbage")
    with pytest.raises(RunDirError, match="damaged or not one lenet wrote") as refused:
        train(config, resume=True, dataset=small_mnist)
    assert "weights_only" not in str(refused.value)  # torch's advice to load unsafely
    # A PyTorch file that is no run's state (someone's own tensors) is refused the same way.
    torch.save({"weights": torch.zeros(3)}, tmp_path / "run" / CHECKPOINT_NAME)
    with pytest.raises(RunDirError, match="damaged or not one lenet wrote"):
        train(config, resume=True, dataset=small_mnist)
    # A run that stopped before its first checkpoint (only its config.json): --force, not
    # --resume, starts it again, and the message says so.
    (tmp_path / "run" / CHECKPOINT_NAME).unlink()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(RunDirError, match="before its first checkpoint.*--force"):
        train(config, resume=True, dataset=small_mnist)


def _lenet(*args, check=True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lenet", *args], capture_output=True, text=True, env=env
    )
    if check and done.returncode != 0:
        raise AssertionError(f"lenet {' '.join(args)} failed:\n{done.stderr}")
    return done


def test_cli_trains_evaluates_and_refuses_to_overwrite(mnist, tmp_path):
    out = tmp_path / "cli-run"
    args = ["train", "--model", "lenet-relu", "--epochs", "1", "--batch-size", "256"]
    done = _lenet(*args, "--out", str(out), "--json")
    summary = json.loads(done.stdout)
    for key in ("model", "epochs", "train_seconds", "val_accuracy", "test_accuracy", "weights"):
        assert key in summary
    assert summary["test_accuracy"] > 0.95
    evaluated = json.loads(_lenet("evaluate", summary["weights"], "--json").stdout)
    assert evaluated["accuracy"] == summary["test_accuracy"]
    assert sum(map(sum, evaluated["confusion"])) == evaluated["count"] == 10_000
    text = _lenet("evaluate", summary["weights"]).stdout
    assert "confusion matrix" in text and "precision" in text
    again = _lenet(*args, "--out", str(out), check=False)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert "Traceback" not in again.stderr
    # Stopped at --target-accuracy: the summary says so, not just fewer epochs.
    early = _lenet("train", "--model", "lenet-relu", "--epochs", "4", "--train-limit", "3000",
                   "--target-accuracy", "0.3", "--out", str(tmp_path / "early"))  # fmt: skip
    assert "after 1 of 4 epochs (target 30.00% reached)" in early.stdout, early.stdout
    # A run that ends at chance without diverging (the sigmoid network's first steps) says so.
    chance = _lenet("train", "--model", "lenet", "--epochs", "1", "--train-limit", "1000",
                    "--out", str(tmp_path / "chance"))  # fmt: skip
    assert "has not started learning" in chance.stderr and "--train-limit" in chance.stderr
    assert "not started learning" not in early.stderr


def test_cli_ctrl_c_then_resume(mnist, tmp_path):
    out = tmp_path / "run"
    args = ["-m", "lenet", "train", "--model", "lenet-relu", "--epochs", "2", "--out", str(out)]
    process = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (out / CHECKPOINT_NAME).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    # SIGTERM (a batch system's or `docker stop`'s) stops as a Ctrl-C does (SIGINT: the test
    # above): after the batch, with a checkpoint.
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert f"lenet train --resume --out {out}" in stderr and "Traceback" not in stderr
    refused = _lenet("train", "--resume", "--out", str(out), "--epochs", "5", check=False)
    assert refused.returncode == 2 and "--epochs cannot change" in refused.stderr
    # The run's own options with --resume added are accepted: they change nothing.
    resumed = _lenet("train", "--resume", "--out", str(out), "--json", "--model", "lenet-relu",
                     "--epochs", "2")  # fmt: skip
    assert json.loads(resumed.stdout)["epochs"] == 2
    assert json.loads(resumed.stdout)["test_accuracy"] > 0.98
    # --force starts over and leaves nothing of the old run (its curves, say) beside the new.
    (out / "learning_curves.png").write_bytes(b"old curves")
    again = _lenet("train", "--model", "lenet-relu", "--epochs", "1", "--train-limit", "512",
                   "--out", str(out), "--force")  # fmt: skip
    assert again.returncode == 0 and not (out / "learning_curves.png").exists()


def test_cli_data_info_and_models(mnist):
    info = json.loads(_lenet("data", "info", "mnist", "--json").stdout)
    assert info["verified"] and info["splits"]["train"]["images"] == 55_000
    counts = [
        a + b
        for a, b in zip(
            info["splits"]["train"]["class_counts"], info["splits"]["val"]["class_counts"]
        )
    ]
    # The class counts of the original training file (shared notes on the data).
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    models = {m["name"]: m for m in json.loads(_lenet("models", "--json").stdout)}
    assert models["lenet"]["parameters"] == 44_426 and models["lenet"]["macs"] == 281_640
    fetched = _lenet("data", "fetch", "mnist").stdout
    assert "mnist: verified in" in fetched


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--model", "alexnet"], "Unknown model 'alexnet'"),
        (["data", "fetch", "--mirror", "example.com"], "must be an http"),
        (["train", "--resume"], "--resume needs --out"),
        (["train", "--epochs", "0"], "must be a positive whole number"),
        (["train", "--optimizer", "rmsprop"], "invalid choice"),
        (["evaluate", "missing.safetensors"], "neither a weights file nor a bundled model"),
        # A model's outputs are its own dataset's classes (and nothing is downloaded).
        (
            ["evaluate", "lenet-relu", "--dataset", "fashion-mnist"],
            "was trained on mnist, so it cannot be evaluated on fashion-mnist",
        ),
        (["report", "lenet", "--dataset", "fashion-mnist"], "cannot be evaluated on"),
        (["predict", "-", "-"], "- (standard input) can be read once"),
        (
            ["train", "--no-validation", "--target-accuracy", "0.9"],
            "--no-validation trains without a validation split",
        ),
        (["train", "--momentum", "0.5"], "--momentum is for --optimizer sgd; adam keeps"),
        (["train", "--out", "{tmp}", "--epochs", "1"], "is not empty (it holds notes.txt, and no"),
        (["predict", "-", "--topk", "three"], "--topk: must be a number, got 'three'"),
    ],
)
def test_cli_bad_input_gets_a_clear_message(args, message, tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    done = _lenet(*args, check=False)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_a_run_folder_names_its_weights_and_a_picture_is_not_weights(tmp_path):
    from lenet.weights import bundled_weights, card_path

    run = tmp_path / "run"
    run.mkdir()
    bundled = bundled_weights()["lenet"]
    shutil.copy(bundled, run / "model.safetensors")
    shutil.copy(card_path(bundled), card_path(run / "model.safetensors"))
    picture = tmp_path / "digit.png"
    Image.new("L", (28, 28)).save(picture)
    # The run folder works wherever weights are asked for, as in `lenet report RUN_DIR`.
    answer = json.loads(_lenet("predict", str(picture), "--weights", str(run), "--json").stdout)
    assert answer["reason"] == "no digit found"
    assert json.loads(_lenet("evaluate", str(run), "--json").stdout)["accuracy"] > 0.98
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "notes.md").write_text("# not weights")
    (tmp_path / "model.pt").write_bytes(b"PK")  # a TorchScript export is a zip
    for weights, message in [
        (picture, "is a picture, not model weights. To read the digit in it: `lenet predict"),
        (tmp_path / "unfinished", "finish it with `lenet train --resume --out"),
        (tmp_path / "unfinished" / "checkpoint.pt", "is the training checkpoint of a run"),
        (tmp_path / "model.pt", "(TorchScript), for your own programs (`torch.jit.load`)"),
        (run / "model.json", "is the model card; the weights are beside it"),
        (tmp_path / "notes.md", "is not model weights: weights are a bundled model's name"),
    ]:
        done = _lenet("evaluate", str(weights), check=False)
        assert done.returncode == 2 and message in done.stderr, done.stderr


def test_a_folder_named_like_a_bundled_model_does_not_hide_it(tmp_path, monkeypatch):
    from lenet.weights import bundled_weights, resolve_weights

    bundled = bundled_weights()
    monkeypatch.chdir(tmp_path)  # where a clone called lenet lies, or a run called lenet-relu
    for name in bundled:
        (tmp_path / name).mkdir()
    assert resolve_weights("lenet") == bundled["lenet"]
    assert resolve_weights(None) in bundled.values()
    with pytest.raises(WeightsError, match="holds no model.safetensors"):
        resolve_weights("./lenet")  # the folder, named as a path


def test_a_device_this_machine_lacks_leaves_no_run_folder(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    done = _lenet("train", "--device", "cuda", "--out", str(out), check=False)
    assert done.returncode == 2 and "sees no CUDA GPU" in done.stderr
    assert not out.exists()


def test_a_diverged_run_is_told_to_lower_its_rate(small_mnist, tmp_path, capsys):
    # lenet5 under SDLM at 25 times the paper recipe's rate blows up in its first pass.
    config = resolve_config(
        "lenet5", "paper", lr=0.01, epochs=1, train_limit=1024, threads=1, out=str(tmp_path / "a")
    )
    train(config, dataset=small_mnist, progress=False)
    warning = capsys.readouterr().err
    assert "epoch 1" in warning and "diverged" in warning and "lower --lr than 0.01" in warning
    # At the recipe's rate it learns, and nothing is said.
    stable = dataclasses.replace(config, lr=0.0004, out=str(tmp_path / "b"))
    train(stable, dataset=small_mnist, progress=False)
    assert "diverged" not in capsys.readouterr().err


def test_only_a_blown_up_loss_counts_as_diverged():
    from lenet.training import _diverged

    uniform = math.log(10)
    assert _diverged({"train_loss": float("nan"), "train_accuracy": 0.5}, 10)
    assert _diverged({"train_loss": 90.0, "train_accuracy": 0.1}, 10)
    # Still at chance with a uniform guess's loss: not started yet (sigmoid nets under SGD).
    assert not _diverged({"train_loss": uniform, "train_accuracy": 0.11}, 10)
    # A high loss on a run that answers well is a loss with large margins, not a blow-up.
    assert not _diverged({"train_loss": 90.0, "train_accuracy": 0.9}, 10)


@pytest.mark.parametrize("total_steps", [1, 2, 3, 4, 5, 8])
def test_the_one_cycle_schedule_runs_for_a_run_of_any_length(total_steps):
    # A run of 4 steps in all (`--epochs 1 --train-limit 500` for mlp) once raised
    # ZeroDivisionError inside PyTorch's OneCycleLR: a warm-up of exactly one step.
    from lenet.training import make_scheduler

    model = torch.nn.Linear(2, 2)
    config = resolve_config("lenet-relu", epochs=1, lr=0.01, schedule="onecycle")
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = make_scheduler(config, optimizer, total_steps)
    rates = []
    for _ in range(total_steps):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert all(math.isfinite(rate) and rate > 0 for rate in rates)
    assert max(rates) <= config.lr * (1 + 1e-9)
