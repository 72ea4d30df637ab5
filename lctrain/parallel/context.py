"""Process groups for data parallel x sequence parallel, and the handle the trainer uses (`ParallelContext`).

Groups come from torch's DeviceMesh, not megatron-core's `parallel_state`: we need two named
dimensions (dp, sp; an expert dimension later is one more mesh dim), per-group timeouts, gloo and
nccl alike, and no process-global singleton (tests build and tear down many layouts in one
interpreter). `parallel_state` also works on gloo, but it creates a dozen groups for TP/PP/CP/EP
that nothing here uses, keeps them in module globals, and only takes timeouts in whole minutes.

Rank layout: global rank = dp_rank * sp + sp_rank, so each SP group is a run of contiguous ranks
(on GPUs: neighbours on one node, where the SP traffic is heaviest).
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lctrain.models.seqops import LocalOps
from lctrain.parallel.comm import CommMeter, all_reduce_coalesced

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _pg_options(backend: str, timeout: datetime.timedelta):
    """Backend options carrying the timeout, so the mesh's sub-groups time out like the world group
    (DeviceMesh otherwise gives them the backend default: 30 min on gloo)."""
    cls = {"gloo": getattr(dist, "ProcessGroupGloo", None), "nccl": getattr(dist, "ProcessGroupNCCL", None)}[backend]
    if cls is None:
        return None
    opts_cls = getattr(cls, "_Options", None) or getattr(cls, "Options", None)
    if opts_cls is None:
        return None
    opts = opts_cls()
    opts._timeout = timeout
    return opts


class ParallelContext:
    """Ranks, groups, device and sequence ops of this process. Build it with `init_parallel`."""

    def __init__(self, *, rank: int, world_size: int, local_rank: int, sp_size: int, device: torch.device,
                 sp_attention: str = "ulysses", backend: Optional[str] = None, mesh=None,
                 owns_process_group: bool = False):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.sp_size = sp_size
        self.dp_size = world_size // sp_size
        self.dp_rank, self.sp_rank = divmod(rank, sp_size)
        self.is_main = rank == 0
        self.device = device
        self.backend = backend
        self.mesh = mesh
        self._owns_pg = owns_process_group
        self.comm_meter = CommMeter()     # shared by the SP ops and the gradient reduction
        distributed = world_size > 1
        self.world_group = dist.group.WORLD if distributed else None
        self.sp_group = mesh.get_group("sp") if mesh is not None else None
        self.dp_group = mesh.get_group("dp") if mesh is not None else None
        if sp_size > 1:
            from lctrain.parallel.seqops import SequenceParallelOps
            self.seq_ops = SequenceParallelOps(self.sp_group, sp_attention=sp_attention, meter=self.comm_meter)
        else:
            self.seq_ops = LocalOps()

    def __repr__(self):
        return (f"ParallelContext(rank={self.rank}/{self.world_size}, dp={self.dp_rank}/{self.dp_size}, "
                f"sp={self.sp_rank}/{self.sp_size}, device={self.device}, backend={self.backend})")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # --- data -----------------------------------------------------------------------------------
    def shard_sequence(self, t: Tensor, dim: int = 1) -> Tensor:
        """This rank's contiguous slice of a full-sequence tensor (tokens, labels, doc_start, ...)."""
        if self.sp_size == 1:
            return t
        T = t.shape[dim]
        if T % self.sp_size:
            raise ValueError(f"sequence length {T} is not divisible by parallel.sp={self.sp_size}")
        L = T // self.sp_size
        return t.narrow(dim, self.sp_rank * L, L).contiguous()

    # --- reductions -----------------------------------------------------------------------------
    def all_reduce_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """SUM of gradients over DP x SP (the loss is already normalised by the global token count).

        Every trainable parameter takes part, a missing gradient counting as zeros, so all ranks
        reduce identical bucket layouts even when a rank did not touch some parameter (an unused
        expert). Tied parameters are reduced once."""
        if not self.distributed:
            return
        grads, seen = [], set()
        for p in params:
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        self.comm_meter.add("grad_allreduce", all_reduce_coalesced(grads, self.world_group))

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        """`t` reduced over the whole world (a new tensor on t's device)."""
        if op not in _REDUCE_OPS:
            raise ValueError(f"all_reduce: op must be one of {', '.join(_REDUCE_OPS)}, got {op!r}")
        if not self.distributed:
            return t.detach().clone()
        x = t.detach().to(self.device, copy=True)
        dist.all_reduce(x, op=_REDUCE_OPS[op], group=self.world_group)
        return x.to(t.device)

    def broadcast_object(self, obj: Any) -> Any:
        """`obj` as seen by global rank 0 (picklable)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.world_group)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.world_group)

    def pop_comm_bytes(self) -> dict[str, int]:
        """Bytes this rank sent per layer type (lasp2, ulysses, lasp2h, halo_conv, halo_window,
        gather, grad_allreduce) since the last call."""
        return self.comm_meter.pop()

    def shutdown(self) -> None:
        """Destroy the process group (no-op when single process or when someone else owns it)."""
        if self._owns_pg and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_pg = False


def _loopback_store(rank: int, world: int, timeout):
    """With MASTER_ADDR on loopback (one node), the TCPStore that init_process_group would create listens
    on every interface; this one listens on the loopback address only, and gloo uses the loopback device
    (GLOO_SOCKET_IFNAME=lo unless set). Under the one-node launcher the store is a FileStore in its private
    directory (LCTRAIN_STORE_DIR): torch's TCPStore client asks DNS for 127.0.0.1's name on every
    connection attempt. None otherwise (env:// as usual)."""
    import ipaddress
    import socket
    private = os.environ.get("LCTRAIN_STORE_DIR")    # the one-node launcher's private directory: no TCP at all
    if private and os.path.isdir(private):
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return dist.FileStore(os.path.join(private, f"store-{attempt}-{os.environ['MASTER_PORT']}"), world)
    addr = os.environ["MASTER_ADDR"]
    try:
        if not ipaddress.ip_address(addr).is_loopback:
            return None
    except ValueError:
        return None                                   # a host name: the normal env:// store
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")      # gloo's pairs on loopback too, no host-name lookup
    port = int(os.environ["MASTER_PORT"])
    if rank != 0:
        return dist.TCPStore(addr, port, world, False, timeout)
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, port))
    sock.listen(128)
    return dist.TCPStore(addr, port, world, True, timeout, master_listen_fd=sock.detach())


def init_parallel(cfg, device_type: str = "cpu") -> ParallelContext:
    """Process groups and device for this process, from torchrun's environment
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and `cfg` (a `ParallelConfig`).

    Single process (WORLD_SIZE unset or 1): no process group. Reuses a process group that is already
    initialised (its world size must agree with WORLD_SIZE)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    sp = int(cfg.sp)
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside world size {world}")
    if sp < 1:
        raise ValueError(f"parallel.sp must be >= 1, got {sp}")
    if world % sp:
        raise ValueError(f"parallel.sp={sp} does not divide world size {world}")
    if cfg.sp_attention not in ("ulysses", "lasp2h"):
        raise ValueError(f"parallel.sp_attention must be 'ulysses' or 'lasp2h', got {cfg.sp_attention!r}")

    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda requested but CUDA is not available")
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise ValueError(f"LOCAL_RANK={local_rank} but only {n} CUDA devices are visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device_type == "cpu":
        device = torch.device("cpu")
    else:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device_type!r}")

    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise ValueError(f"parallel.backend=nccl needs CUDA devices, device is {device_type}")

    if world == 1:
        return ParallelContext(rank=0, world_size=1, local_rank=local_rank, sp_size=1, device=device,
                               sp_attention=cfg.sp_attention, backend=None)

    timeout = datetime.timedelta(seconds=float(cfg.timeout_s))
    owns = False
    if dist.is_initialized():
        if dist.get_world_size() != world:
            raise ValueError(f"process group has {dist.get_world_size()} ranks but WORLD_SIZE={world}")
        rank = dist.get_rank()
        backend = dist.get_backend()
    else:
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise ValueError(f"WORLD_SIZE={world} but {var} is not set (launch with torchrun)")
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout,
                                store=_loopback_store(rank, world, timeout))
        owns = True

    from torch.distributed.device_mesh import init_device_mesh
    opts = _pg_options(backend, timeout)
    override = {"dp": (backend, opts), "sp": (backend, opts)} if opts is not None else None
    mesh = init_device_mesh(device_type, (world // sp, sp), mesh_dim_names=("dp", "sp"),
                            backend_override=override)
    return ParallelContext(rank=rank, world_size=world, local_rank=local_rank, sp_size=sp, device=device,
                           sp_attention=cfg.sp_attention, backend=backend, mesh=mesh,
                           owns_process_group=owns)
