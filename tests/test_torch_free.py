"""The serving install without PyTorch: `lenet predict` and `lenet serve` on onnxruntime only."""

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import venv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI in this interpreter with torch made unimportable, and reports whether any
# module imported it anyway.
BLOCK_TORCH = """
import importlib.abc, importlib.util, json, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch' (blocked by the test)")
sys.meta_path.insert(0, NoTorch())
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "torch" else find_spec(name, *a)
from lenet.cli import main
status = main(sys.argv[1:])
print(json.dumps({"status": status, "torch": "torch" in sys.modules}))
"""


def digit_png(mnist, index=0):
    buffer = io.BytesIO()
    Image.fromarray(mnist.test.images[index, 0].numpy()).save(buffer, "PNG")
    return buffer.getvalue(), int(mnist.test.labels[index])


def test_nothing_on_the_onnx_path_imports_torch(mnist, tmp_path):
    png, label = digit_png(mnist)
    (tmp_path / "digit.png").write_bytes(png)
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, "predict", str(tmp_path / "digit.png"), "--json"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    lines = done.stdout.splitlines()
    assert json.loads(lines[0])["digit"] == label, done.stderr
    assert json.loads(lines[1]) == {"status": 0, "torch": False}


def pip(python, *args):
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.needs_index  # deselect with -m "not needs_index" where pip cannot reach an index
def test_a_venv_without_torch_predicts_and_serves(mnist, tmp_path):
    """The documented serving install, for real: a new venv, the requirements file, the
    package without its dependencies; pip's cache makes it quick."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    pip(python, "-r", str(ROOT / "requirements" / "serve-onnx.txt"))
    pip(python, "--no-deps", "-e", str(ROOT))
    png, label = digit_png(mnist, 1)
    (tmp_path / "digit.png").write_bytes(png)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    lacks = subprocess.run([str(python), "-c", "import torch"], capture_output=True, env=env)
    assert lacks.returncode != 0, "torch must not be installed in the serving venv"
    done = subprocess.run(
        [str(env_dir / "bin" / "lenet"), "predict", "--backend", "onnx", "--json",
         str(tmp_path / "digit.png")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["digit"] == label and answer["confidence"] > 0.9
    assert np.isclose(sum(answer["probabilities"]), 1, atol=1e-4)

    # `lenet serve` in the same venv: auto picks onnx where torch is missing.
    port = free_port()
    server = subprocess.Popen(
        [str(env_dir / "bin" / "lenet"), "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as ready:
                    if ready.status == 200:
                        break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()
                assert time.monotonic() < deadline, "lenet serve did not become ready"
                time.sleep(0.2)
        request = urllib.request.Request(
            f"{base}/v1/predict", data=png, headers={"Content-Type": "image/png"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read())["digit"] == label
        with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as response:
            assert json.loads(response.read())["backend"] == "onnx"
    finally:
        server.terminate()
        server.wait(timeout=10)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
