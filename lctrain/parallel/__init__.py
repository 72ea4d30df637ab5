"""Data parallel x sequence parallel: process groups, batch sharding, gradient reduction, and the
sequence-parallel ops (LASP-2, Ulysses, LASP-2H, halo exchange) behind `ctx.ops`.

    pc = init_parallel(cfg.parallel, device_type)
    ctx = SeqContext(doc_start=pc.shard_sequence(doc_start), ops=pc.seq_ops)
    loss = (token_losses_local.sum() / global_token_count)   # global count via pc.all_reduce
    loss.backward(); pc.all_reduce_grads(model.parameters())
"""
from lctrain.parallel.comm import CommMeter
from lctrain.parallel.context import ParallelContext, init_parallel
from lctrain.parallel.seqops import SequenceParallelOps

__all__ = ["CommMeter", "ParallelContext", "SequenceParallelOps", "init_parallel"]
