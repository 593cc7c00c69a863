"""benchmarks/results.py: the table it writes from recorded runs, and where it writes it."""

from __future__ import annotations

import importlib
import statistics
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def results(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("results", None)
    return importlib.import_module("results")


def _run(error: float, finished: str = "t", parameters: int = 44_426) -> dict:
    return {
        "test_error": error,
        "parameters": parameters,
        "train_seconds": 90.0,
        "finished": finished,
        "machine": {"cpu": "CPU X", "cores": 2, "python": "3.11", "torch": "2.13.0"},
    }


def test_rows_are_commands_a_user_can_type(results):
    for row in results.ROWS:
        if row.members_of is None:
            assert len(row.seeds) >= 3
            assert row.shown_command().startswith("lenet train --model ")
            argv = row.train_command(7, Path("runs/x"))
            assert argv[-4:] == ["--seed", "7", "--out", "runs/x"]
        else:
            source = next(r for r in results.ROWS if r.key == row.members_of)
            assert len(source.seeds) == 5
            assert row.shown_command().startswith("lenet ensemble ")


def test_the_table_gives_mean_and_standard_deviation_of_the_seeds(results):
    errors = [0.0081, 0.0095, 0.0088]
    recorded = {"runs": {f"lenet5-s{i}": _run(e, parameters=60_000) for i, e in enumerate(errors)}}
    text = results.table(recorded)
    mean = statistics.fmean(errors) * 100
    sd = statistics.stdev(errors) * 100
    line = next(line for line in text.splitlines() if "`lenet5` (1998), no distortions" in line)
    assert f"{mean:.2f}% ± {sd:.2f}" in line
    assert "| 60,000 |" in line and "| 3 |" in line and "0.95%" in line
    assert "lenet train --model lenet5 --seed SEED" in line
    assert "| 1.5 |" in line  # 90 s of training per run
    assert "CPU X, 2 cores" in text
    # Rows without runs are left out rather than shown empty.
    assert "lenet-plus" not in text


def test_the_ensemble_row_shows_its_members_and_goes_stale_when_they_change(results):
    members = {f"lenet-plus-best-s{i}": _run(0.005, finished=f"t{i}") for i in range(5)}
    row = next(r for r in results.ROWS if r.members_of)
    ensemble = dict(_run(0.0031), members_test_error=[0.005] * 5)
    ensemble["members_finished"] = results.members_finished({"runs": members}, row)
    recorded = {"runs": {**members, row.key: ensemble}}
    text = results.table(recorded)
    assert "0.31%" in text and "1 ensemble of 5 (members 0.50% ± 0.00)" in text
    assert ensemble["members_finished"] == [f"t{i}" for i in range(5)]
    members["lenet-plus-best-s3"] = _run(0.004, finished="later")
    assert results.members_finished({"runs": members}, row) != ensemble["members_finished"]


def test_the_table_replaces_only_what_lies_between_the_markers(results, tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results.START}\nold table\n{results.END}\nafter\n")
    monkeypatch.setattr(results, "README", readme)
    results.write_readme("| new |")
    assert readme.read_text() == f"intro\n{results.START}\n| new |\n{results.END}\nafter\n"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="lacks the markers"):
        results.write_readme("| new |")


def test_runs_trained_side_by_side_are_marked_and_saving_keeps_anothers_runs(
    results, tmp_path, monkeypatch
):
    solo = {f"lenet5-s{i}": _run(0.01) for i in range(3)}
    side_by_side = {f"lenet5-s{i}": dict(_run(0.01), threads=1) for i in range(3)}
    assert "*" not in results.table({"runs": solo})
    text = results.table({"runs": side_by_side})
    line = next(line for line in text.splitlines() if "no distortions" in line)
    assert "| 1.5 * |" in line and "side by side" in text

    # Two invocations training different rows at once: neither loses the other's runs.
    monkeypatch.setattr(results, "RESULTS", tmp_path / "results.json")
    mine = {"runs": {"lenet5-s0": _run(0.01)}}
    results.save_results({"runs": {"lenet-book-s0": _run(0.04)}})  # the other invocation
    results.save_results(mine)
    assert set(results.load_results()["runs"]) == {"lenet5-s0", "lenet-book-s0"}
    assert set(mine["runs"]) == {"lenet5-s0", "lenet-book-s0"}
