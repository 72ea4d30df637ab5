"""Launch scripts: bad input fails with one line before anything starts; the single-node, multi-node
and SLURM scripts build the right torchrun commands; two torchrun "nodes" of 2 processes each on
127.0.0.1 train one ZeRO run together, like one process."""
import os
import stat
import subprocess

import pytest

from lctrain.train import checkpoint as ckpt
from tests.foundation_utils import ROOT
from tests.zero_utils import (STEPS, assert_losses_close, by_step, free_port, launcher_env, quiet, recipe, run_launch,
                              write_recipe)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lctrain launch: error: "), res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["{missing}", "--nproc-per-node", "2"], "recipe: file not found"),
    (["{recipe}", "--nproc-per-node", "3", "--set", "parallel.sp=2"], "parallel.sp: 2 does not divide the world size 3"),
    (["{recipe}", "--nproc-per-node", "2", "--set", "parallel.sp=2", "--set", "model.d_model=48",
      "--set", "model.mixers.attention.n_heads=3"], "n_heads: 3 heads are not divisible by parallel.sp=2"),
    (["{recipe}", "--nproc-per-node", "2", "--set", "train.seq_lne=64"], "train.seq_lne: unknown key"),
    (["{recipe}", "--nproc-per-node", "0"], "--nproc-per-node: must be >= 1"),
    (["{recipe}", "--max-restarts", "-1"], "--max-restarts: must be >= 0"),
])
def test_bad_launch_input_is_one_line_before_any_work(tmp_path, args, expected):
    recipe_path = write_recipe(tmp_path / "r.yaml")
    run_dir = tmp_path / "run"
    args = [a.format(missing=tmp_path / "missing.yaml", recipe=recipe_path) for a in args]
    line = one_line_error(run_launch("single_node.sh", *args, "--run-dir", run_dir, timeout=120))
    assert expected in line
    assert not run_dir.exists()


def test_multi_node_needs_a_rendezvous_host(tmp_path):
    recipe_path = write_recipe(tmp_path / "r.yaml")
    res = run_launch("multi_node.sh", recipe_path, "--nproc-per-node", "2",
                     env=launcher_env(NNODES=2, NODE_RANK=1), timeout=120)
    assert "--master-addr: 2 nodes need a rendezvous host" in one_line_error(res)
    res = run_launch("multi_node.sh", recipe_path, env=launcher_env(NNODES=2, NODE_RANK=2, MASTER_ADDR="h"), timeout=120)
    assert "--node-rank: 2 is outside 0..1" in one_line_error(res)


def test_commands_single_multi_node_and_slurm(tmp_path):
    recipe_path = write_recipe(tmp_path / "r.yaml")
    res = run_launch("single_node.sh", recipe_path, "--nproc-per-node", "2", "--max-restarts", "3",
                     "--set", "parallel.zero_stage=2", "--dry-run", timeout=120)
    assert res.returncode == 0, res.stderr
    cmd = res.stdout.split()
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" not in cmd
    # one node: a c10d rendezvous in a private file (no TCP store), the workers' MASTER_ADDR on loopback
    assert cmd[cmd.index("--rdzv-conf") + 1] == "store_type=file" and cmd[cmd.index("--local-addr") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2" and cmd[cmd.index("--max-restarts") + 1] == "3"
    assert cmd[cmd.index("-m", 3):][:4] == ["-m", "lctrain.train.worker", "train", recipe_path]
    assert cmd[-2:] == ["--set", "parallel.zero_stage=2"]

    # SLURM: a fake scontrol / srun; srun runs the per-node command once per node with SLURM_NODEID set
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\nprintf "gpu-a17\\ngpu-a18\\n"\n')
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                  'for id in 0 1; do SLURM_NODEID=$id "$@" --dry-run || exit $?; done\n')
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    env = launcher_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-a[17-18]", SLURM_NNODES=2,
                       SLURM_JOB_ID=4242, SLURM_GPUS_ON_NODE=2, SLURM_SUBMIT_DIR=ROOT)
    res = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), recipe_path, "--max-restarts", "2",
                          "--set", "train.steps=3"], capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    cmds = [line.split() for line in res.stdout.splitlines()]
    assert len(cmds) == 2
    for node, cmd in enumerate(cmds):
        assert cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--nproc-per-node") + 1] == "2"
        assert cmd[cmd.index("--rdzv-backend") + 1] == "c10d"
        assert cmd[cmd.index("--rdzv-endpoint") + 1] == "gpu-a17:29500"
        assert cmd[cmd.index("--rdzv-id") + 1] == "4242" and cmd[cmd.index("--max-restarts") + 1] == "2"
        assert cmd[cmd.index("--rdzv-conf") + 1] == f"is_host={1 if node == 0 else 0}"
        assert cmd[-2:] == ["--set", "train.steps=3"]
    # a bad recipe stops the job before srun starts anything
    res = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), recipe_path, "--set", "parallel.sp=8"],
                         capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert res.returncode == 2 and "parallel.sp: 8 does not divide the world size 4" in res.stderr
    assert res.stdout == ""


def test_two_nodes_on_one_machine_train_together(tmp_path):
    """`launch/multi_node.sh` twice (NODE_RANK 0 and 1, 2 processes each, c10d rendezvous on 127.0.0.1):
    one ZeRO-1 run over 4 ranks, with the same losses as one process (same global batch)."""
    from lctrain.train.trainer import train
    single = str(tmp_path / "single")
    train(recipe(), run_dir=single, log=quiet)
    recipe_path = write_recipe(tmp_path / "r.yaml")
    run = tmp_path / "run"
    port = free_port()
    procs = []
    for node in (0, 1):
        env = launcher_env(NNODES=2, NODE_RANK=node, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NPROC_PER_NODE=2)
        procs.append(subprocess.Popen(["bash", os.path.join(ROOT, "launch", "multi_node.sh"), recipe_path,
                                       "--run-dir", str(run), "--rdzv-id", f"two-nodes-{port}",
                                       "--set", "parallel.zero_stage=1", "--set", "train.batch_size=1"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
    assert sum('"status": "completed"' in o[0] for o in outs) == 1          # global rank 0 lives on one node
    got = by_step(str(run))
    assert sorted(got) == list(range(1, STEPS + 1))
    st = ckpt.read_state(ckpt.latest_checkpoint(str(run)))
    assert st["world_size"] == 4 and st["dp_size"] == 4 and st["zero_stage"] == 1 and st["global_batch"] == 4
    assert_losses_close(got, by_step(single), range(1, STEPS + 1), "two nodes")
