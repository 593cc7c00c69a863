"""Installed size of the two ways to serve: with PyTorch, and torch-free on onnxruntime.

    python benchmarks/install_size.py

Builds two fresh virtual environments in a temporary folder, exactly as the README says:
  torch:      pip install -c constraints.txt ".[serve]"   (what `lenet serve` needs, torch backend)
  torch-free: pip install -r requirements/serve-onnx.txt && pip install --no-deps .
and prints the size on disk of each environment's site-packages (and of the whole venv), with
the largest packages. pip's cache makes a second run quick.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def size_of(path: Path) -> int:
    """Bytes on disk (allocated blocks, as `du` counts them)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            stat = os.lstat(os.path.join(folder, name))
            total += stat.st_blocks * 512
    return total


def pip(python: Path, *args: str) -> None:
    command = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*command, *args], check=True, cwd=ROOT)


def build(folder: Path, steps: list[list[str]]) -> Path:
    venv.EnvBuilder(with_pip=True).create(folder)
    python = folder / "bin" / "python"
    for step in steps:
        pip(python, *step)
    return next((folder / "lib").glob("python*/site-packages"))


def main() -> None:
    print(f"python {platform.python_version()}, {platform.platform()}")
    setups = {
        "torch (pip install -c constraints.txt '.[serve]')": [
            ["-c", "constraints.txt", ".[serve]"]
        ],
        "torch-free (requirements/serve-onnx.txt + pip install --no-deps .)": [
            ["-r", "requirements/serve-onnx.txt"],
            ["--no-deps", "."],
        ],
    }
    print("\n| setup | site-packages MB | whole venv MB | largest packages (MB) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, steps) in enumerate(setups.items()):
            site = build(Path(tmp) / f"venv{index}", steps)
            packages = sorted(
                ((size_of(p), p.name) for p in site.iterdir() if p.is_dir()), reverse=True
            )[:5]
            largest = ", ".join(f"{n} {s / 2**20:.0f}" for s, n in packages)
            print(
                f"| {name} | {size_of(site) / 2**20:,.0f} | "
                f"{size_of(Path(tmp) / f'venv{index}') / 2**20:,.0f} | {largest} |",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
