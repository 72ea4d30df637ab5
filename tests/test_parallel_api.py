"""The ParallelContext API the trainer uses: setup errors, single process, DP x SP rank layout and
groups, reductions, timeouts; and the worker harness itself (a failing or hung worker fails the
test instead of hanging it)."""
from __future__ import annotations

import time

import pytest
import torch

from lctrain.config import ParallelConfig
from lctrain.models.seqops import LocalOps
from lctrain.parallel import init_parallel
from tests.dist_utils import run_workers

TIMEOUT = 90
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for k in ENV:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_single_process(clean_env):
    pc = init_parallel(ParallelConfig(), "cpu")
    assert (pc.rank, pc.world_size, pc.dp_size, pc.sp_size, pc.dp_rank, pc.sp_rank) == (0, 1, 1, 1, 0, 0)
    assert pc.is_main and pc.device == torch.device("cpu") and type(pc.seq_ops) is LocalOps
    t = torch.arange(6.).view(1, 6)
    assert pc.shard_sequence(t) is t
    r = pc.all_reduce(t, "max")
    assert torch.equal(r, t) and r is not t
    assert pc.broadcast_object({"a": 1}) == {"a": 1}
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.)
    pc.all_reduce_grads([p])
    assert torch.equal(p.grad, torch.full((2,), 3.))
    pc.barrier()
    assert pc.pop_comm_bytes() == {}
    pc.shutdown()


@pytest.mark.parametrize("env, cfg, device, message", [
    ({"WORLD_SIZE": "4"}, {"sp": 3}, "cpu", "parallel.sp=3 does not divide world size 4"),
    ({}, {"sp": 2}, "cpu", "parallel.sp=2 does not divide world size 1"),
    ({"WORLD_SIZE": "2"}, {}, "cpu", "WORLD_SIZE=2 but MASTER_ADDR is not set (launch with torchrun)"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, {}, "cpu", "RANK=2 is outside world size 2"),
    ({"WORLD_SIZE": "two"}, {}, "cpu", "environment variable WORLD_SIZE='two' is not an integer"),
    ({}, {"backend": "nccl"}, "cpu", "parallel.backend=nccl needs CUDA devices, device is cpu"),
    ({}, {}, "tpu", "device must be 'cpu', 'cuda' or 'auto', got 'tpu'"),
])
def test_setup_errors_are_one_line_value_errors(clean_env, env, cfg, device, message):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(ValueError) as err:
        init_parallel(ParallelConfig(**cfg), device)
    assert str(err.value) == message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_value_error(clean_env):
    with pytest.raises(ValueError, match="CUDA is not available"):
        init_parallel(ParallelConfig(), "cuda")


def _layout_worker(rank, world, sp):
    import torch.distributed as dist
    pc = init_parallel(ParallelConfig(sp=sp, timeout_s=60), "cpu")
    out = {"ids": (pc.rank, pc.dp_rank, pc.sp_rank, pc.dp_size, pc.sp_size, pc.is_main),
           "sp_group": dist.get_process_group_ranks(pc.sp_group),
           "dp_group": dist.get_process_group_ranks(pc.dp_group),
           "offset": pc.seq_ops.position_offset(5)}
    full = torch.arange(2 * 8).view(2, 8)
    out["shard"] = pc.shard_sequence(full).tolist()
    try:
        pc.shard_sequence(torch.zeros(1, 7))
    except ValueError as e:
        out["shard_error"] = str(e)
    x = torch.tensor([float(rank + 1)])
    out["sum"], out["max"], out["min"] = (float(pc.all_reduce(x, op)) for op in ("sum", "max", "min"))
    out["bcast"] = pc.broadcast_object({"from": rank})
    # gradients: a tied parameter listed twice is reduced once; a missing grad counts as zeros
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    a.grad = torch.full((3,), float(rank))
    if rank % 2 == 0:
        b.grad = torch.ones(2, 2)
    frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    pc.all_reduce_grads([a, b, a, frozen])
    out["grads"] = (a.grad.tolist(), b.grad.tolist(), frozen.grad)
    out["bytes"] = pc.pop_comm_bytes()
    out["bytes_after_pop"] = pc.pop_comm_bytes()
    pc.barrier()
    pc.shutdown()
    out["destroyed"] = not dist.is_initialized()
    return out


@pytest.mark.timeout(TIMEOUT)
def test_dp_x_sp_layout_and_reductions():
    world, sp = 4, 2
    res = run_workers(_layout_worker, world, sp, timeout=TIMEOUT)
    for rank, r in enumerate(res):
        dp_rank, sp_rank = divmod(rank, sp)
        assert r["ids"] == (rank, dp_rank, sp_rank, 2, 2, rank == 0)
        assert r["sp_group"] == [dp_rank * sp, dp_rank * sp + 1]          # contiguous ranks
        assert r["dp_group"] == [sp_rank, sp_rank + sp]
        assert r["offset"] == 5 * sp_rank
        assert r["shard"] == [list(range(4 * sp_rank, 4 * sp_rank + 4)),
                              list(range(8 + 4 * sp_rank, 8 + 4 * sp_rank + 4))]
        assert r["shard_error"] == "sequence length 7 is not divisible by parallel.sp=2"
        assert (r["sum"], r["max"], r["min"]) == (10.0, 4.0, 1.0)
        assert r["bcast"] == {"from": 0}
        assert r["grads"] == ([6.0] * 3, [[2.0, 2.0], [2.0, 2.0]], None)
        # ring all-reduce of 7 fp32 numbers: 2 (P-1)/P of the payload
        assert r["bytes"] == {"grad_allreduce": 2 * 3 * 7 * 4 // 4}
        assert r["bytes_after_pop"] == {}
        assert r["destroyed"]


def _hang_worker(rank, world):
    """Rank 1 never joins rank 0's collective on their SP group: rank 0's must fail by timeout."""
    import torch.distributed as dist
    pc = init_parallel(ParallelConfig(sp=2, timeout_s=2), "cpu")
    if rank == 0:
        try:
            dist.all_reduce(torch.ones(1), group=pc.sp_group)
        except Exception as e:            # gloo raises on timeout; the message names it
            return f"raised: {e}"
        return "returned"
    time.sleep(6)                         # stay connected past rank 0's timeout
    return "slept"


@pytest.mark.timeout(TIMEOUT)
def test_hung_collective_times_out():
    res = run_workers(_hang_worker, 2, timeout=TIMEOUT)
    assert res[0].startswith("raised:") and "timed out" in res[0].lower(), res[0]


def _failing_worker(rank, world):
    import torch.distributed as dist
    init_parallel(ParallelConfig(timeout_s=60), "cpu")
    if rank == 1:
        raise RuntimeError("boom on rank 1")
    dist.barrier()                         # would wait for rank 1 forever without the harness
    return "unreachable"


def _sleeping_worker(rank, world):
    time.sleep(60)


@pytest.mark.timeout(TIMEOUT)
def test_harness_reports_failures_and_hangs():
    with pytest.raises(AssertionError, match=r"(?s)rank 1 ---.*RuntimeError: boom on rank 1"):
        run_workers(_failing_worker, 2, timeout=60)
    with pytest.raises(TimeoutError, match=r"workers \[0, 1\] of 2 did not finish within 2s"):
        run_workers(_sleeping_worker, 2, timeout=2)
