"""Ahead-of-time compile check (no GPU needed): every launch configuration the Triton tests make,
compiled to cubins for sm_90 and sm_80 in fp32 and bf16 (scripts/triton_compile_check.py; --full
there for all dtypes, production shapes and every autotune config)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "triton_compile_check.py")


def _run(*args, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_compile_check_reports_compiler_errors():
    p = _run("--selftest", timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "selftest: broken failed to compile" in p.stdout


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90_and_sm80():
    p = _run(timeout=1500)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert " 0 failures" in out and "sm_90, sm_80" in out, out[-2000:]
