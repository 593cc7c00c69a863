"""The results table: every row trained with several seeds on real MNIST, beside the literature.

    python benchmarks/results.py                 # train what is missing, write the README table
    python benchmarks/results.py --rows lenet-book,lenet5     # only these rows
    python benchmarks/results.py --list          # the rows and their commands; trains nothing
    python benchmarks/results.py --table         # rewrite the table from the saved results
    python benchmarks/results.py --jobs 2        # two seeds at a time, one thread each

Each row is one `lenet train` command run once per seed, as a separate process, exactly as a
user would type it (the table prints that command). The ensemble row joins the seeds of the
best single model with `lenet ensemble`. Every finished run is recorded at once in
benchmarks/results/results.json (model card figures, the command, the machine), so an
interrupted invocation loses at most the run it was in, and a later one trains only what is
missing. --rerun trains recorded rows again. --jobs N trains N seeds of a row at a time, each with
--threads (cores / N) added to its command: on 2 cores two one-thread runs of these small
networks finish sooner than two two-thread runs one after the other. The Markdown table goes
into README.md between the markers `<!-- results:start -->` and `<!-- results:end -->`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from machine import cpu_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "results.json"
README = ROOT / "README.md"
RUNS = Path("runs") / "results"  # relative to ROOT, where every command runs
START, END = "<!-- results:start -->", "<!-- results:end -->"


@dataclass(frozen=True)
class Row:
    """One line of the table: a `lenet train` command (without seed and output folder)."""

    key: str
    title: str
    recipe: str  # in words, for the table (the command has every detail)
    args: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    paper: str = ""  # the published figure to compare with (../anchors: LeCun et al. 1998)
    # For the ensemble row: the row whose runs (one per seed) are the members.
    members_of: str | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def train_command(self, seed: int, out: Path) -> list[str]:
        return ["lenet", "train", *self.args, "--seed", str(seed), "--out", str(out)]

    def shown_command(self) -> str:
        """The command as the table prints it (SEED stands for each seed)."""
        if self.members_of is not None:
            return (
                f"lenet ensemble runs/results/{self.members_of}-s0 ... "
                f"runs/results/{self.members_of}-s4 --out {self.key}.safetensors"
            )
        return shlex.join(["lenet", "train", *self.args]) + " --seed SEED"


ROWS = (
    Row(
        "lenet-book",
        "`lenet`, the book's recipe",
        "Adam 0.001, batch 256, 5 epochs, pixels/255",
        ("--model", "lenet", "--recipe", "book"),
    ),
    Row(
        "lenet-default",
        "`lenet`, lenet's fast default recipe",
        "Adam one-cycle 0.01, batch 256, 10 epochs, standardised",
        ("--model", "lenet"),
    ),
    Row(
        "lenet-best",
        "`lenet`, our best recipe",
        "Adam one-cycle 0.01, batch 128, affine distortions, 30 epochs",
        ("--model", "lenet", "--recipe", "best"),
    ),
    Row(
        "lenet-relu-default",
        "`lenet-relu`, the default recipe",
        "Adam one-cycle 0.02, batch 256, label smoothing 0.1, 2 epochs",
        ("--model", "lenet-relu"),
    ),
    Row(
        "lenet5",
        "`lenet5` (1998), no distortions, 20 epochs",
        "eq. 9 loss, Adam one-cycle 0.003, 20 epochs",
        ("--model", "lenet5"),
        paper="0.95%",
    ),
    Row(
        "lenet5-long",
        "`lenet5` (1998), no distortions, 40 epochs",
        "eq. 9 loss, Adam one-cycle 0.002, 40 epochs",
        ("--model", "lenet5", "--epochs", "40", "--lr", "0.002"),
        paper="0.95%",
    ),
    Row(
        "lenet5-batch32",
        "`lenet5` (1998), no distortions, batches of 32, 20 epochs",
        "eq. 9 loss, Adam one-cycle 0.001, batch 32, 20 epochs (the paper updated per image)",
        ("--model", "lenet5", "--batch-size", "32", "--lr", "0.001"),
        paper="0.95%",
    ),
    Row(
        "lenet5-batch32-long",
        "`lenet5` (1998), no distortions, batches of 32, 40 epochs",
        "eq. 9 loss, Adam one-cycle 0.001, batch 32, 40 epochs",
        ("--model", "lenet5", "--batch-size", "32", "--lr", "0.001", "--epochs", "40"),
        paper="0.95%",
    ),
    Row(
        "lenet5-batch16",
        "`lenet5` (1998), no distortions, batches of 16, 20 epochs",
        "eq. 9 loss, Adam one-cycle 0.0007, batch 16, 20 epochs",
        ("--model", "lenet5", "--batch-size", "16", "--lr", "0.0007"),
        paper="0.95%",
    ),
    Row(
        "lenet5-all-batch32",
        "`lenet5` (1998), no distortions, all 60,000 training images, batches of 32, 20 epochs",
        "eq. 9 loss, Adam one-cycle 0.001, batch 32, 20 epochs, nothing held out",
        ("--model", "lenet5", "--batch-size", "32", "--lr", "0.001", "--no-validation"),
        paper="0.95%",
    ),
    Row(
        "lenet5-all",
        "`lenet5` (1998), no distortions, all 60,000 training images, 20 epochs",
        "eq. 9 loss, Adam one-cycle 0.003, 20 epochs, nothing held out (as the paper trained)",
        ("--model", "lenet5", "--no-validation"),
        paper="0.95%",
    ),
    Row(
        "lenet5-paper",
        "`lenet5` (1998), no distortions, the paper's optimizer, 20 epochs",
        "eq. 9 loss, SDLM (appendix C), the paper's rate steps from 0.0004, batch 32, 20 epochs",
        ("--model", "lenet5", "--recipe", "paper"),
        paper="0.95%",
    ),
    Row(
        "lenet5-distorted",
        "`lenet5` (1998), with distortions, 20 epochs",
        "the same on affine-distorted digits",
        ("--model", "lenet5", "--augment", "affine"),
        paper="0.80%",
    ),
    Row(
        "lenet5-best",
        "`lenet5` (1998), with distortions, 60 epochs",
        "our best recipe: affine distortions, 60 epochs, Adam one-cycle 0.003",
        ("--model", "lenet5", "--recipe", "best"),
        paper="0.80%",
    ),
    Row(
        "lenet-plus-best",
        "`lenet-plus`, the best LeNet-sized model",
        "AdamW one-cycle 0.01, wd 5e-4, label smoothing 0.1, affine, 20 epochs",
        ("--model", "lenet-plus", "--recipe", "best"),
        seeds=(0, 1, 2, 3, 4),
        paper="0.40% (Simard et al. 2003, elastic)",
    ),
    Row(
        "lenet-plus-ensemble",
        "ensemble of 5 `lenet-plus`",
        "mean of the five runs' calibrated probabilities",
        (),
        seeds=(),
        members_of="lenet-plus-best",
        paper="0.23% (35 CNNs, Ciresan et al. 2012)",
    ),
)


def load_results() -> dict:
    if RESULTS.is_file():
        return json.loads(RESULTS.read_text(encoding="utf-8"))
    return {"runs": {}}


def save_results(results: dict) -> None:
    """Write ``results``, keeping runs recorded meanwhile by another invocation (one that
    trains other rows at the same time): runs are only ever added or replaced."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    merged = load_results()
    merged["runs"].update(results["runs"])
    results["runs"] = merged["runs"]  # the caller sees the other invocation's runs too
    tmp = RESULTS.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, RESULTS)  # an interrupted write never leaves half a file


def lenet_command() -> list[str]:
    """`lenet` from the same environment as this Python."""
    return [sys.executable, "-m", "lenet"]


def machine() -> dict:
    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def record(card: dict, command: str, seconds: float) -> dict:
    """What the table needs from a finished run's model card."""
    return {
        "test_error": card["test_error"],
        "test_accuracy": card["test_accuracy"],
        "parameters": card["parameters"],
        "train_seconds": card.get("train_seconds"),
        "wall_seconds": round(seconds, 1),
        "epochs": card.get("epochs_trained"),
        "threads": card.get("threads"),
        "device": card.get("device"),
        "torch": card.get("torch_version"),
        "command": command,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }


def run_training(row: Row, seed: int, threads: int | None = None) -> dict:
    out = RUNS / f"{row.key}-s{seed}"
    argv = row.train_command(seed, out)
    if threads is not None:
        argv += ["--threads", str(threads)]
    print(f"[{row.key} seed {seed}] {shlex.join(argv)}", flush=True)
    started = time.perf_counter()
    subprocess.run([*lenet_command(), *argv[1:], "--force"], check=True, cwd=ROOT)
    card = json.loads((ROOT / out / "model.json").read_text(encoding="utf-8"))
    return record(card, shlex.join(argv), time.perf_counter() - started)


def run_ensemble(row: Row) -> dict:
    source = next(r for r in ROWS if r.key == row.members_of)
    members = [str(RUNS / f"{source.key}-s{seed}") for seed in source.seeds]
    missing = [m for m in members if not (ROOT / m / "model.safetensors").is_file()]
    if missing:
        raise SystemExit(
            f"{row.key}: the member runs {', '.join(missing)} are not on this machine; "
            f"train them first: python benchmarks/results.py --rows {source.key} --rerun"
        )
    out = RUNS / f"{row.key}.safetensors"
    argv = ["lenet", "ensemble", *members, "--out", str(out)]
    print(f"[{row.key}] {shlex.join(argv)}", flush=True)
    started = time.perf_counter()
    subprocess.run([*lenet_command(), *argv[1:]], check=True, cwd=ROOT)
    card = json.loads((ROOT / out).with_suffix(".json").read_text(encoding="utf-8"))
    card["epochs_trained"] = None
    result = record(card, shlex.join(argv), time.perf_counter() - started)
    result["members_test_error"] = [1 - m["test_accuracy"] for m in card["members"]]
    result["members_finished"] = members_finished(load_results(), row)
    return result


def members_finished(results: dict, row: Row) -> list[str | None]:
    """When each member run of an ensemble row was recorded: a retrained member makes the
    recorded ensemble stale."""
    source = next(r for r in ROWS if r.key == row.members_of)
    runs = results["runs"]
    return [runs.get(f"{source.key}-s{seed}", {}).get("finished") for seed in source.seeds]


def row_runs(results: dict, row: Row) -> list[dict]:
    """The recorded runs of a row (one per seed; one for an ensemble)."""
    if row.members_of is not None:
        return [results["runs"][row.key]] if row.key in results["runs"] else []
    keys = (f"{row.key}-s{seed}" for seed in row.seeds)
    return [results["runs"][k] for k in keys if k in results["runs"]]


def shared(run: dict) -> bool:
    """Whether the run was one of several trained at a time (--jobs): one thread of many."""
    return run.get("threads") == 1 and (run["machine"].get("cores") or 1) > 1


def percent(values: list[float]) -> str:
    mean = statistics.fmean(values) * 100
    if len(values) < 2:
        return f"{mean:.2f}%"
    return f"{mean:.2f}% ± {statistics.stdev(values) * 100:.2f}"


def table(results: dict) -> str:
    """The Markdown table of every row with at least one recorded run."""
    lines = [
        "| model | parameters | recipe | test error (mean ± sd) | seeds | paper "
        "| minutes per run | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    machines = set()
    for row in ROWS:
        runs = row_runs(results, row)
        if not runs:
            continue
        errors = [run["test_error"] for run in runs]
        if row.members_of is not None:
            members = runs[0]["members_test_error"]
            seeds = f"1 ensemble of {len(members)} (members {percent(members)})"
            minutes = "(members' training)"
        else:
            seeds = str(len(runs))
            train = [run["train_seconds"] or 0 for run in runs]
            minutes = f"{statistics.fmean(train) / 60:.1f}"
            if any(shared(run) for run in runs):
                minutes += " *"
        for run in runs:
            m = run["machine"]
            cores, python, torch = m["cores"], m["python"], m["torch"]
            machines.add(f"{m['cpu']}, {cores} cores, Python {python}, torch {torch}")
        lines.append(
            f"| {row.title} | {runs[0]['parameters']:,} | {row.recipe} | {percent(errors)} "
            f"| {seeds} | {row.paper or '-'} | {minutes} | `{row.shown_command()}` |"
        )
    footer = [
        "",
        "Machine: " + "; ".join(sorted(machines)) + ".",
        "Minutes: training time per run (the model card's `train_seconds`: the epochs and "
        "their evaluations, without loading data).",
    ]
    if any(shared(run) for row in ROWS for run in row_runs(results, row)):
        footer += [
            "",
            "\\* Seeds trained side by side (`results.py --jobs`), one thread each, sharing the "
            "cores: longer per run than one run on all cores.",
        ]
    return "\n".join(lines + footer)


def write_readme(text: str) -> None:
    readme = README.read_text(encoding="utf-8")
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md lacks the markers {START} and {END}; add them first.")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{text}\n{END}{tail}", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", help="comma-separated row keys (default: all)")
    parser.add_argument("--rerun", action="store_true", help="train recorded runs again")
    parser.add_argument("--list", action="store_true", help="print the rows and exit")
    parser.add_argument("--table", action="store_true", help="only rewrite the table")
    parser.add_argument("--no-readme", action="store_true", help="print the table only")
    parser.add_argument(
        "--jobs", type=int, default=1, help="seeds trained at a time (each on cores/N threads)"
    )
    args = parser.parse_args()
    known = {row.key: row for row in ROWS}
    chosen = list(known) if not args.rows else args.rows.split(",")
    unknown = [key for key in chosen if key not in known]
    if unknown:
        raise SystemExit(f"unknown rows {', '.join(unknown)}; known: {', '.join(known)}")
    if args.list:
        for key in chosen:
            row = known[key]
            print(f"{key}: {row.shown_command()}  (seeds {list(row.seeds) or '-'})")
        return 0
    results = load_results()
    if not args.table:
        for key in chosen:
            row = known[key]
            if row.members_of is not None:
                recorded = results["runs"].get(key)
                stale = recorded is None or recorded.get("members_finished") != (
                    members_finished(results, row)
                )
                if args.rerun or stale:
                    results["runs"][key] = run_ensemble(row)
                    save_results(results)
                continue
            todo = [s for s in row.seeds if args.rerun or f"{key}-s{s}" not in results["runs"]]
            threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                running = {pool.submit(run_training, row, s, threads): s for s in todo}
                for done in as_completed(running):
                    # Recorded as each run ends (here, on this thread only).
                    results["runs"][f"{key}-s{running[done]}"] = done.result()
                    save_results(results)
                    if not args.no_readme:
                        write_readme(table(results))
    text = table(results)
    print(text)
    if not args.no_readme:
        write_readme(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
