"""Building an ensemble: several trained weights files combined into one that answers as one.

`lenet ensemble A B C --out FILE` loads the members, checks that they read the same input the
same way, joins them into one ``lenet.models.Ensemble`` (the mean of their calibrated
probabilities), fits the ensemble's own temperature on the validation split, measures it and
every member on the test set, and writes one weights file with a model card like any other.
Everything that loads weights (the Recognizer, `lenet predict`, `evaluate`, `serve`, `export`)
then takes the ensemble as it takes a single model.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lenet import __version__
from lenet.calibration import calibrate
from lenet.data import load_dataset
from lenet.device import resolve_device
from lenet.errors import WeightsError
from lenet.evaluation import evaluate_model, trained_on
from lenet.models import ENSEMBLE, Ensemble, count_macs, count_parameters
from lenet.weights import LoadedWeights, file_sha256, load_weights, resolve_weights, save_weights

# Two normalisations closer than this are the same (they are computed in float64 from the
# same training images, so members trained on one dataset agree to the last digit).
NORMALIZATION_TOLERANCE = 1e-6


@dataclass(frozen=True)
class EnsembleResult:
    """What `lenet ensemble` built and how well the ensemble and each member do."""

    path: Path
    card: dict[str, Any]

    @property
    def test_accuracy(self) -> float:
        """The ensemble's accuracy on the test split."""
        return float(self.card["test_accuracy"])

    def summary(self) -> dict[str, Any]:
        """The JSON printed by `lenet ensemble --json`."""
        keep = ("members", "parameters", "val_accuracy", "test_accuracy", "test_error")
        return {"weights": str(self.path), **{key: self.card[key] for key in keep}}


def check_compatible(members: Sequence[LoadedWeights]) -> None:
    """Members must read the same input the same way and answer the same classes."""
    first = members[0]
    for other in members:
        if other.name == ENSEMBLE:
            raise WeightsError(
                f"{other.path} is itself an ensemble: list its members instead "
                f"({', '.join(str(m.get('weights')) for m in other.card.get('members', []))})."
            )
        for key in ("dataset", "classes"):
            if other.card.get(key) != first.card.get(key):
                raise WeightsError(
                    f"{other.path} was trained on {key} {other.card.get(key)!r} but {first.path} "
                    f"on {first.card.get(key)!r}: an ensemble's members must answer the same "
                    "question. Leave one of them out."
                )
        if trained_on(other.card, "val"):
            raise WeightsError(
                f"{other.path} was trained with --no-validation, on the validation split too; "
                "an ensemble fits its temperature and reports its validation accuracy on that "
                "split, which would then be images a member has seen. Use members trained with "
                "the validation split held out (the default)."
            )
        a, b = first.normalization, other.normalization
        if abs(a.mean - b.mean) > NORMALIZATION_TOLERANCE or abs(a.std - b.std) > (
            NORMALIZATION_TOLERANCE
        ):
            raise WeightsError(
                f"{other.path} normalises its input as (x - {b.mean:.6g}) / {b.std:.6g} but "
                f"{first.path} as (x - {a.mean:.6g}) / {a.std:.6g}: the members of one ensemble "
                "must share one input. Combine models trained with the same --normalize setting "
                "(lenet5 and lenet5-linear use their own fixed scaling)."
            )


def build_ensemble(
    members: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
) -> EnsembleResult:
    """Combine trained weights (files, run folders or bundled names) into one ensemble file."""
    if len(members) < 2:
        raise WeightsError("An ensemble needs at least two members: give two or more weights.")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise WeightsError(f"--out {out}: write the ensemble to a .safetensors file.")
    torch_device = resolve_device(device)
    paths = [resolve_weights(m) for m in members]
    seen: dict[str, Path] = {}
    for path in paths:
        # The same weights twice would count one model double, not add a member.
        digest = file_sha256(path)
        if digest in seen:
            raise WeightsError(
                f"{seen[digest]} and {path} are the same weights: an ensemble's members must "
                "be different models (e.g. trained with different --seed)."
            )
        seen[digest] = path
    loaded = [load_weights(path, torch_device) for path in paths]
    check_compatible(loaded)
    model = Ensemble([m.model for m in loaded], [m.temperature for m in loaded])
    model = model.to(torch_device).eval()
    first = loaded[0]
    norm = first.normalization
    data = load_dataset(str(first.card.get("dataset", "mnist")), data_dir)

    member_cards = []
    for member in loaded:
        test = evaluate_model(member.model, data.test.images, data.test.labels, norm)
        member_cards.append(
            {
                "model": member.name,
                "weights": str(member.path),
                "temperature": member.temperature,
                "test_accuracy": test.accuracy,
                "command": member.card.get("command"),
            }
        )
    val = evaluate_model(model, data.val.images, data.val.labels, norm)
    test = evaluate_model(model, data.test.images, data.test.labels, norm)
    card = {
        "model": ENSEMBLE,
        "members": member_cards,
        "parameters": count_parameters(model),
        "macs_per_image": count_macs(model),
        "dataset": first.card.get("dataset"),
        "dataset_md5": first.card.get("dataset_md5"),
        "normalization": norm.to_dict(),
        "input": first.card.get("input"),
        "classes": first.card.get("classes"),
        "combination": "mean of the members' calibrated probabilities",
        "val_accuracy": val.accuracy,
        "test_accuracy": test.accuracy,
        "test_error": 1.0 - test.accuracy,
        **calibrate(model, data, norm),
        "device": str(torch_device),
        "torch_version": str(torch.__version__),
        "lenet_version": __version__,
        "command": shlex.join(["lenet", "ensemble", *(str(m) for m in members), "--out", str(out)]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    return EnsembleResult(save_weights(out, model, card), card)
