"""benchmarks/gpu_check.py --dry-run: the GPU acceptance command's logic on CPU (interpreter, toy
sizes): every part runs, the JSON and the table are written, correctness cases pass."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--dry-run",
                        "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["env"]["dry_run"] and res["env"]["interpreter"]
    assert res["a"] and all(r["ok"] for r in res["a"]), res["a"]
    assert {r["dtype"] for r in res["a"]} == {"fp32", "fp16"}
    assert {r["gate"] for r in res["b"]} == {"head", "key"} and all("ours_ms" in r for r in res["b"])
    assert [r["model"] for r in res["c"]] == ["mamba2-cpu", "gla-cpu"] and all(r["ok"] for r in res["c"])
    table = (tmp_path / "gpu_check.md").read_text()
    assert "(a) correctness" in table and "(b) fwd+bwd" in table and "(c) training steps" in table


def test_gpu_check_without_cuda_says_so(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--out",
                        str(tmp_path), "--parts", "a"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert p.returncode == 2 and "no CUDA device" in p.stderr
