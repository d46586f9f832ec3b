"""benchmarks/gpu_check.sh: its dry run reports what it finds and exits cleanly; without CUDA it refuses clearly."""
import subprocess
import sys

import pytest
import torch

from tests.conftest import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "benchmarks" / "gpu_check.sh"


def run_script(*args, tmp_path):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OUT_DIR": str(tmp_path / "out"),
                               "KERNEL_WHEELS": str(tmp_path / "none")})


def test_dry_run_exits_cleanly_and_writes_nothing(tmp_path):
    result = run_script("--dry-run", tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"torch {torch.__version__}" in result.stdout
    assert "kernel wheels: none" in result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_without_cuda_the_check_refuses_with_a_clear_message(tmp_path):
    result = run_script(tmp_path=tmp_path)
    assert result.returncode == 2
    assert "no CUDA device here, nothing to check" in result.stdout
    assert not (tmp_path / "out").exists()
