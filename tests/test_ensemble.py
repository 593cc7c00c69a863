"""Ensembles: built from real trained weights, loaded wherever weights load, refused if unsound."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from lenet import Recognizer
from lenet.config import resolve_config
from lenet.ensemble import build_ensemble
from lenet.errors import WeightsError
from lenet.evaluation import evaluate
from lenet.models import Ensemble
from lenet.training import train
from lenet.weights import load_weights


@pytest.fixture(scope="module")
def members(small_mnist, tmp_path_factory):
    """Two small models trained for real (different seeds), as `lenet train` writes them."""
    folder = tmp_path_factory.mktemp("members")
    paths = []
    for seed in (0, 1):
        config = resolve_config(
            "mlp", epochs=1, train_limit=4000, seed=seed, out=str(folder / f"s{seed}")
        )
        paths.append(train(config, dataset=small_mnist, progress=False).weights)
    return paths


@pytest.fixture(scope="module")
def ensemble(members, tmp_path_factory, mnist):
    out = tmp_path_factory.mktemp("ensemble") / "pair.safetensors"
    return build_ensemble([members[0], members[1].parent], out)  # a file and a run folder


def test_the_ensemble_answers_the_mean_of_its_members_calibrated_probabilities(
    members, ensemble, mnist
):
    loaded = load_weights(ensemble.path)
    assert isinstance(loaded.model, Ensemble)
    images = mnist.test.images[:200]
    norm = loaded.normalization
    with torch.no_grad():
        combined = torch.exp(loaded.model(norm.apply(images)))
        expected = torch.stack(
            [
                torch.softmax(m.model(norm.apply(images)) / m.temperature, dim=1)
                for m in map(load_weights, members)
            ]
        ).mean(0)
    assert torch.allclose(combined, expected, atol=1e-6)
    assert torch.allclose(combined.sum(1), torch.ones(200), atol=1e-5)


def test_the_card_describes_members_and_measures_the_ensemble(members, ensemble, mnist):
    card = ensemble.card
    assert card["model"] == "ensemble"
    assert [m["model"] for m in card["members"]] == ["mlp", "mlp"]
    singles = [evaluate(path).accuracy for path in members]
    assert [m["test_accuracy"] for m in card["members"]] == pytest.approx(singles)
    assert card["parameters"] == 2 * load_weights(members[0]).card["parameters"]
    again = evaluate(ensemble.path)
    assert again.accuracy == pytest.approx(card["test_accuracy"])
    assert again.count == 10_000
    assert card["temperature"] > 0 and card["val_ece_after_calibration"] >= 0


def test_the_recognizer_cli_and_export_take_an_ensemble(ensemble, mnist, tmp_path):
    recognizer = Recognizer.load(ensemble.path)
    digits = mnist.test.images[:50, 0].numpy()
    answers = recognizer.predict_batch(list(digits))
    correct = sum(a.best_guess == int(y) for a, y in zip(answers, mnist.test.labels[:50]))
    assert correct >= 40  # two small perceptrons together: about 90% on real test digits
    assert all(abs(sum(a.probabilities) - 1) < 1e-4 for a in answers)

    from lenet.export import export

    onnx_file = tmp_path / "pair.onnx"
    exported = export(ensemble.path, onnx_file, "onnx")
    assert exported.parity is not None and exported.parity.ok
    onnx = Recognizer.load(onnx_file, backend="onnx")
    assert [a.best_guess for a in onnx.predict_batch(list(digits))] == [
        a.best_guess for a in answers
    ]
    probs = np.array([a.probabilities for a in onnx.predict_batch(list(digits))])
    assert np.allclose(probs, [a.probabilities for a in answers], atol=1e-5)


def _lenet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lenet", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_builds_an_ensemble_and_prints_json(members, tmp_path, mnist):
    out = tmp_path / "cli.safetensors"
    done = _lenet("ensemble", *map(str, members), "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["weights"] == str(out)
    assert len(summary["members"]) == 2
    assert out.is_file() and out.with_suffix(".json").is_file()


def test_unsound_ensembles_are_refused_with_a_reason(members, ensemble, tmp_path):
    with pytest.raises(WeightsError, match="at least two members"):
        build_ensemble([members[0]], tmp_path / "one.safetensors")
    with pytest.raises(WeightsError, match="itself an ensemble"):
        build_ensemble([members[0], ensemble.path], tmp_path / "nested.safetensors")
    with pytest.raises(WeightsError, match="holds no model.safetensors: it is not a run folder"):
        build_ensemble([members[0], tmp_path], tmp_path / "folder.safetensors")
    with pytest.raises(WeightsError, match=r"\.safetensors file"):
        build_ensemble(members, tmp_path / "pair.onnx")
    # The same weights twice (or a copy of them) would count one model double.
    twin = tmp_path / "twin.safetensors"
    shutil.copy(members[0], twin)
    shutil.copy(members[0].with_suffix(".json"), twin.with_suffix(".json"))
    for pair in ([members[0], members[0]], [members[0], twin]):
        with pytest.raises(WeightsError, match="same weights"):
            build_ensemble(pair, tmp_path / "double.safetensors")

    # A member that reads its input differently (another normalisation) cannot be averaged.
    other = tmp_path / "other.safetensors"
    shutil.copy(members[1], other)
    card = json.loads(members[1].with_suffix(".json").read_text())
    card["normalization"] = {"mean": 0.0, "std": 1.0}
    other.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="normalises its input"):
        build_ensemble([members[0], other], tmp_path / "mixed.safetensors")

    card = json.loads(members[1].with_suffix(".json").read_text())
    card["dataset"] = "fashion-mnist"
    other.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="same question"):
        build_ensemble([members[0], other], tmp_path / "mixed.safetensors")

    # A member trained on the validation split too would make the ensemble's temperature and
    # validation accuracy figures of images it has seen.
    # (On all its images: with a --train-limit under 55,000 it would have seen none of them.)
    card = json.loads(members[1].with_suffix(".json").read_text())
    card["config"].update(validation=False, train_limit=None)
    other.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="trained with --no-validation"):
        build_ensemble([members[0], other], tmp_path / "seen.safetensors")

    done = _lenet("ensemble", str(members[0]), "--out", str(tmp_path / "x.safetensors"))
    assert done.returncode == 2 and "at least two members" in done.stderr


def test_an_ensemble_card_without_members_is_a_clear_error(ensemble, tmp_path):
    broken = tmp_path / "broken.safetensors"
    shutil.copy(ensemble.path, broken)
    card = dict(ensemble.card, members=[])
    broken.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="lists no members"):
        load_weights(broken)
