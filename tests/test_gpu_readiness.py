"""What can be checked of the GPU path without a GPU: bf16 autocast, and benchmarks/gpu.sh."""

import shutil
import subprocess
from pathlib import Path

import pytest

from lenet.config import resolve_config
from lenet.errors import ConfigError
from lenet.training import train

GPU_SH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"


def test_amp_bf16_trains_and_is_recorded(small_mnist, tmp_path):
    config = resolve_config("mlp", epochs=1, train_limit=3000, amp="bf16", out=str(tmp_path / "r"))
    result = train(config, dataset=small_mnist, progress=False)
    assert result.card["config"]["amp"] == "bf16" and "--amp bf16" in result.card["command"]
    assert result.test_accuracy > 0.8


def test_unknown_amp_is_refused():
    with pytest.raises(ConfigError, match="Unknown --amp 'fp8'"):
        resolve_config("lenet", amp="fp8")


def test_gpu_sh_is_valid_bash_and_says_when_there_is_no_gpu(tmp_path):
    assert subprocess.run(["bash", "-n", str(GPU_SH)]).returncode == 0
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi: gpu.sh would really run")
    done = subprocess.run(["bash", str(GPU_SH), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "no NVIDIA GPU here" in done.stderr
    assert not any(tmp_path.iterdir())  # nothing half-written
