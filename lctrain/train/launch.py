"""Launch a recipe on one or many nodes with torchrun, after checking everything that can be checked
before any process starts.

    python -m lctrain.train.launch RECIPE [--nproc-per-node N] [--nnodes N] [--node-rank R]
        [--master-addr HOST] [--master-port PORT] [--rdzv-id ID] [--max-restarts K]
        [--run-dir DIR] [--resume auto|never|PATH] [--set key=value ...] [--dry-run]

`launch/single_node.sh`, `launch/multi_node.sh` and `launch/slurm.sbatch` are thin wrappers around it.
Every option also comes from the environment (the command line wins): NPROC_PER_NODE, NNODES,
NODE_RANK, MASTER_ADDR, MASTER_PORT, RDZV_ID, MAX_RESTARTS, and under SLURM SLURM_NNODES,
SLURM_NODEID, SLURM_GPUS_ON_NODE.

- One node: like `torchrun --standalone --nproc-per-node N`, without the network: the rendezvous and the
  workers' store are files in a private directory, gloo listens on 127.0.0.1, nothing resolves a name.
- Several nodes: `torchrun --nnodes N --rdzv-backend c10d --rdzv-endpoint MASTER_ADDR:MASTER_PORT
  --rdzv-id ID`; run the same command on every node (node 0, or the node that owns MASTER_ADDR,
  hosts the rendezvous store). Checkpoints must live on a filesystem all nodes share.
- `--max-restarts K`: when a worker dies, torchrun stops the group and starts it again (up to K
  times); the trainer resumes from the run directory's latest checkpoint (`--resume auto`).
  The launcher sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with torch 2.13's default (workers share
  the rendezvous agent's store), a restarted gloo group reads the dead attempt's addresses and fails.

Bad input fails here with one line naming the problem, before torchrun or any worker starts. torchrun
runs in this process: when a rank fails, the output ends with that rank's own one-line error and one
summary line (`lctrain launch: rank R exited with status S ...`), the exit status is the rank's, and
torchrun's ChildFailedError traceback is not printed.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Optional

from lctrain.schema import ConfigError, OneLineParser

EXIT_USAGE = 2


def validate_layout(recipe, world_size: int, local_devices: Optional[int] = None) -> None:
    """Everything about the parallel layout that is wrong before a process starts (ConfigError)."""
    p = recipe.parallel
    if world_size < 1:
        raise ConfigError("world size", f"must be >= 1, got {world_size}")
    if world_size % p.sp:
        raise ConfigError("parallel.sp", f"{p.sp} does not divide the world size {world_size} "
                                         f"(nnodes x nproc_per_node): pick a divisor of {world_size}")
    if recipe.train.seq_len % p.sp:
        raise ConfigError("train.seq_len", f"{recipe.train.seq_len} must be divisible by parallel.sp={p.sp}")
    if p.sp > 1 and p.sp_attention == "ulysses":
        model = recipe.model
        for letter in dict.fromkeys(model.pattern):
            cfg = model.mixers.get("attention") if letter == "A" else None
            if cfg is not None and getattr(cfg, "window", None) is None and cfg.n_heads % p.sp:
                raise ConfigError("model.mixers.attention.n_heads",
                                  f"{cfg.n_heads} heads are not divisible by parallel.sp={p.sp} (Ulysses attention "
                                  f"splits heads over the sequence-parallel group): use parallel.sp_attention=lasp2h "
                                  f"or a parallel.sp that divides {cfg.n_heads}")
    if p.zero_stage > 0:
        import importlib.util
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("parallel.zero_stage", f"{p.zero_stage} needs DeepSpeed, which is not installed "
                                                     "(pip install deepspeed, or set parallel.zero_stage=0)")
    device = recipe.train.device
    if p.backend == "nccl" and device == "cpu":
        raise ConfigError("parallel.backend", "nccl needs GPUs but train.device is cpu (use gloo or auto)")
    if local_devices is not None and device == "cuda":
        if local_devices == 0:
            raise ConfigError("train.device", "cuda requested but this node has no GPU")


def _env(name: str, *fallbacks: str) -> Optional[str]:
    for n in (name, *fallbacks):
        v = os.environ.get(n)
        if v not in (None, ""):
            return v
    return None


def _int(value, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(what, f"must be an integer, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="lctrain launch",
                                description="Validate a recipe's layout, then start it with torchrun.")
    p.add_argument("recipe", help="path to a YAML recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field (repeatable)")
    p.add_argument("--nproc-per-node", "--nproc_per_node", dest="nproc", help="processes on this node (env NPROC_PER_NODE; "
                   "default: GPUs on this node for a GPU recipe, else 1)")
    p.add_argument("--nnodes", help="number of nodes (env NNODES / SLURM_NNODES; default 1)")
    p.add_argument("--node-rank", "--node_rank", dest="node_rank", help="this node's rank (env NODE_RANK / SLURM_NODEID)")
    p.add_argument("--master-addr", "--master_addr", dest="master_addr",
                   help="rendezvous host for several nodes (env MASTER_ADDR)")
    p.add_argument("--master-port", "--master_port", dest="master_port", help="rendezvous port (env MASTER_PORT; default 29500)")
    p.add_argument("--rdzv-id", dest="rdzv_id", help="rendezvous id shared by the nodes of one job (env RDZV_ID / "
                   "SLURM_JOB_ID; default: the recipe name)")
    p.add_argument("--max-restarts", "--max_restarts", dest="max_restarts",
                   help="restart the whole group this many times after a failure (env MAX_RESTARTS; default 0)")
    p.add_argument("--run-dir", help="run directory (default: the recipe's run_dir)")
    p.add_argument("--resume", default="auto", metavar="auto|never|PATH")
    p.add_argument("--fresh", action="store_true", help="start from step 0, moving a used run dir's contents aside")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command instead of running it")
    return p


def local_gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def plan(args) -> list[str]:
    """Validate everything and return the torchrun command (a list of arguments)."""
    nnodes = _int(args.nnodes or _env("NNODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES") or 1, "--nnodes")
    if nnodes < 1:
        raise ConfigError("--nnodes", f"must be >= 1, got {nnodes}")
    nproc_raw = args.nproc or _env("NPROC_PER_NODE", "SLURM_GPUS_ON_NODE")
    nproc = _int(nproc_raw, "--nproc-per-node") if nproc_raw is not None else None
    if nproc is not None and nproc < 1:
        raise ConfigError("--nproc-per-node", f"must be >= 1, got {nproc}")
    node_rank_raw = args.node_rank or _env("NODE_RANK", "SLURM_NODEID")
    node_rank = _int(node_rank_raw, "--node-rank") if node_rank_raw is not None else None
    if node_rank is not None and not 0 <= node_rank < nnodes:
        raise ConfigError("--node-rank", f"{node_rank} is outside 0..{nnodes - 1} (--nnodes {nnodes})")
    max_restarts = _int(args.max_restarts or _env("MAX_RESTARTS") or 0, "--max-restarts")
    if max_restarts < 0:
        raise ConfigError("--max-restarts", f"must be >= 0, got {max_restarts}")
    port = _int(args.master_port or _env("MASTER_PORT") or 29500, "--master-port")
    if not 0 < port < 65536:
        raise ConfigError("--master-port", f"must be in 1..65535, got {port}")
    addr = args.master_addr or _env("MASTER_ADDR")
    if nnodes > 1 and not addr:
        raise ConfigError("--master-addr", f"{nnodes} nodes need a rendezvous host: pass --master-addr or set "
                                           "MASTER_ADDR (the address of node 0)")
    from lctrain.config import load_recipe
    recipe = load_recipe(args.recipe, args.overrides)
    gpu_recipe = recipe.train.device == "cuda" or (recipe.train.device == "auto" and recipe.parallel.backend != "gloo")
    gpus = local_gpu_count() if gpu_recipe else 0
    if nproc is None:
        nproc = gpus or 1
    if recipe.train.device == "cuda" or (recipe.train.device == "auto" and gpus):
        if gpus and nproc > gpus:
            raise ConfigError("--nproc-per-node", f"{nproc} processes but this node has {gpus} GPUs")
    validate_layout(recipe, nnodes * nproc, gpus if gpu_recipe else None)
    if args.resume not in ("auto", "never"):
        from lctrain.train.checkpoint import resolve_checkpoint
        resolve_checkpoint(args.resume)

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--max-restarts", str(max_restarts)]
    if nnodes == 1:
        # torchrun --standalone, but without the network: the c10d rendezvous keeps its store in a private
        # file (store_type=file; an empty endpoint: a fresh mkstemp file, or our private directory's, see
        # run_torchrun), the workers get MASTER_ADDR=127.0.0.1, and nothing asks DNS for this host's name
        import uuid
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", "", "--rdzv-id", uuid.uuid4().hex[:12],
                "--rdzv-conf", "store_type=file", "--local-addr", LOOPBACK]
    else:
        rdzv_id = args.rdzv_id or _env("RDZV_ID", "SLURM_JOB_ID") or recipe.name
        cmd += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{addr}:{port}",
                "--rdzv-id", str(rdzv_id)]
        if node_rank is not None:
            cmd += ["--rdzv-conf", f"is_host={1 if node_rank == 0 else 0}"]
    cmd += ["-m", "lctrain.train.worker", "train", os.path.abspath(args.recipe)]
    if args.run_dir:
        cmd += ["--run-dir", os.path.abspath(args.run_dir)]
    if args.resume != "auto":
        cmd += ["--resume", args.resume]
    if args.fresh:
        cmd += ["--fresh"]
    for o in args.overrides:
        cmd += ["--set", o]
    return cmd


LOOPBACK = "127.0.0.1"


def _no_fqdn() -> None:
    """Single node: torchrun's agent calls `socket.getfqdn` (a DNS query) only to label its event records
    and error reports with the host name; the plain host name does that without the network."""
    import socket
    socket.getfqdn = lambda name="": name or socket.gethostname()


def _quiet_torchrun() -> None:
    """torchrun's own logging (banners, 'sending SIGTERM', the failure table) is replaced by our summary."""
    import logging
    if os.environ.get("LCTRAIN_DEBUG") or os.environ.get("LOGLEVEL"):
        return
    os.environ["LOGLEVEL"] = "CRITICAL"          # elastic's loggers read it when their modules are imported
    import torch.distributed.run  # noqa: F401
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    del os.environ["LOGLEVEL"]


def _failure_summary(err) -> tuple[str, int]:
    """The failing rank's own one-line error (from its torchelastic error file) and the exit status. The
    first failure by the time the rank recorded it: the others are usually its consequences (a peer lost)."""
    failures = list(err.failures.items())

    def when(item):
        # consequences, not causes: a rank that lost its peer, and a rank torchrun's agent stopped (SIGTERM)
        # because another one had failed
        rank, f = item
        data = f.error_file_data if isinstance(f.error_file_data, dict) else {}
        consequence = ("lost the connection to another rank" in str(f.message)
                       or (f.exitcode == -15 and not data.get("lctrain_time")))
        return consequence, data.get("lctrain_time") or f.timestamp, rank

    rank, f = min(failures, key=when)
    data = f.error_file_data if isinstance(f.error_file_data, dict) else {}
    # the rank's own line, unless rank 0 printed it (its own, or the same error)
    printed = {g.message for r, g in failures
               if r == 0 and isinstance(g.error_file_data, dict) and g.error_file_data.get("lctrain_time")}
    msg = f.message if isinstance(f.message, str) and data.get("lctrain_time") and f.message not in printed else ""
    if f.exitcode < 0:
        status, code = f"was killed by {f.signal_name()}", 128 - f.exitcode
    else:
        status, code = f"exited with status {f.exitcode}", f.exitcode or 1
    others = f" (the first of {len(failures)} failed ranks)" if len(failures) > 1 else ""
    summary = f"lctrain launch: rank {rank} {status}{others}; the run stopped"
    return (msg + "\n" if msg else "") + summary, code


def run_torchrun(cmd: list[str], loopback: bool) -> int:
    """Run torchrun (`cmd` = python -m torch.distributed.run ARGS) in this process: on failure, print
    the failing rank's one-line error and one summary line instead of torchrun's ChildFailedError
    traceback; exit with that rank's status (128 + N for a signal)."""
    _quiet_torchrun()
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    private = None
    if loopback:
        import tempfile
        _no_fqdn()
        # mode 0700, removed at the end: the rendezvous file and the workers' FileStore (their own TCPStore
        # would listen on every interface, and torch's TCPStore client asks DNS for 127.0.0.1's name)
        private = tempfile.mkdtemp(prefix="lctrain-store-")
        os.environ["LCTRAIN_STORE_DIR"] = private
        cmd = list(cmd)
        cmd[cmd.index("--rdzv-endpoint") + 1] = os.path.join(private, "rendezvous")
    os.environ["LCTRAIN_LAUNCHER"] = "1"       # workers report their one-line errors to us (error files)
    try:
        torchrun.run(torchrun.parse_args(cmd[3:]))
    except ChildFailedError as e:
        text, code = _failure_summary(e)
        print(text, file=sys.stderr, flush=True)
        return code
    except SignalException as e:
        print(f"lctrain launch: stopped by {signal_name(e.sigval)}", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    finally:
        if private:
            import shutil
            shutil.rmtree(private, ignore_errors=True)
    return 0


def signal_name(signum) -> str:
    import signal
    try:
        return signal.Signals(int(signum)).name
    except ValueError:
        return f"signal {int(signum)}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cmd = plan(args)
    except ConfigError as e:
        print(f"lctrain launch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"lctrain launch: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    # torchrun (torch 2.13) otherwise lets the workers of a restarted group share the agent's store
    # with the dead attempt's keys: gloo then connects to the dead ranks' addresses and the restart
    # fails. Without sharing, every attempt gets a fresh store on a fresh port.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if int(cmd[cmd.index("--nproc-per-node") + 1]) > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets for N > 1 workers, without its banner
    return run_torchrun(cmd, loopback="--local-addr" in cmd and cmd[cmd.index("--local-addr") + 1] == LOOPBACK)


if __name__ == "__main__":
    sys.exit(main())
