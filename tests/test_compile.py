"""`train.compile`: blocks run through torch.compile give the eager model's loss and gradients.

Covers packed documents (doc starts inside rows), activation checkpointing, every mixer / FFN family
and sequence parallelism (SP = 2, gloo workers). One test compiles with inductor (the real code
generator, ~30 s cold on a shared 2-core box); the others use `aot_eager` (dynamo graph capture,
graph breaks at the sequence ops and AOT autograd, without C++ code generation) to stay fast.
"""
from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_workers
from tests.test_parallel_models import FAMILIES, _batch, _build, _loss_sum, _sp_step

GRAD_TOL = dict(rtol=1e-4, atol=2e-6)


def _loss_and_grads(model, tokens, labels, ds):
    loss = _loss_sum(model, tokens, labels, ds) / (labels != -100).sum()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(raw, backend, checkpointing=False):
    eager, compiled = _build(raw), _build(raw)
    compiled.compile_blocks(backend=backend)
    tokens, labels, ds = _batch(2)
    for m in (eager, compiled):
        m.activation_checkpointing = checkpointing
    ref_loss, ref = _loss_and_grads(eager, tokens, labels, ds)
    loss, grads = _loss_and_grads(compiled, tokens, labels, ds)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(grads) == set(ref)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref[n], **GRAD_TOL, msg=lambda m: f"grad of {n}: {m}")
    assert set(compiled.state_dict()) == set(eager.state_dict())      # names unchanged (checkpoints)


@pytest.mark.slow
def test_inductor_matches_eager_with_documents_and_checkpointing():
    """Mamba-2 (conv, chunk scan, gated norm), attention (RoPE) and SwiGLU, compiled by inductor."""
    raw = {"arch": "transformer", "pattern": "MA",
           "mixers": {"mamba2": {"d_state": 8, "headdim": 16}, "attention": {"n_heads": 4, "n_kv_heads": 2}}}
    _compare(raw, "inductor", checkpointing=True)


@pytest.mark.parametrize("family", ["hybrid", "hydra"])
def test_every_mixer_compiles_exactly(family):
    """Every mixer (M, G, B, A, W, C; X, R) and FFN (S, E, P), packed documents."""
    _compare(FAMILIES[family][0], "aot_eager")


def _sp_worker(rank, world, sp, raw, state):
    from lctrain.config import ParallelConfig
    from lctrain.parallel import SequenceParallelOps, init_parallel
    pc = init_parallel(ParallelConfig(sp=sp, timeout_s=90), "cpu")
    model = _build(raw)
    model.load_state_dict(state)
    model.compile_blocks(backend="aot_eager")
    model.activation_checkpointing = True
    ops = SequenceParallelOps(pc.sp_group, sp_attention="lasp2h", meter=pc.comm_meter)
    tokens, labels, ds = _batch(2)
    loss = _sp_step(pc, model, tokens, labels, ds, ops)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    pc.shutdown()
    return float(loss), grads


@pytest.mark.timeout(300)
def test_compiled_sequence_parallel_matches_single_process():
    """Compiled blocks + activation checkpointing under SP = 2 (LASP-2, halo conv, LASP-2H attention)
    reproduce the eager single-process loss and gradients."""
    raw = FAMILIES["hybrid"][0]
    model = _build(raw)
    tokens, labels, ds = _batch(2)
    ref_loss, ref = _loss_and_grads(model, tokens, labels, ds)
    for loss, grads in run_workers(_sp_worker, 2, 2, raw, model.state_dict(), timeout=240):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for n, g in grads.items():
            torch.testing.assert_close(g, ref[n], **GRAD_TOL, msg=lambda m: f"grad of {n}: {m}")


def test_train_compile_runs_the_same_steps(tmp_path, monkeypatch):
    """`train.compile: true` compiles the trainer's model (here with aot_eager) and trains the same
    losses as eager; the checkpoint's parameter names are unchanged."""
    from lctrain.models.base import LanguageModel
    from lctrain.train import checkpoint as ckpt
    from lctrain.train.trainer import train
    from tests.foundation_utils import read_metrics, tiny_recipe

    calls = []
    original = LanguageModel.compile_blocks
    monkeypatch.setattr(LanguageModel, "compile_blocks",
                        lambda self, **kw: calls.append(kw) or original(self, backend="aot_eager"))
    cache = str(tmp_path / "cache")
    runs = {}
    for flag in (False, True):
        run = str(tmp_path / f"run-{flag}")
        train(tiny_recipe(cache, steps=3, val_every=3, compile=flag), run_dir=run, log=lambda m: None)
        runs[flag] = read_metrics(run)
    assert len(calls) == 1
    for a, b in zip(runs[False], runs[True]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert runs[True][-1]["val_loss"] == pytest.approx(runs[False][-1]["val_loss"], rel=1e-5)
    assert ckpt.list_checkpoints(str(tmp_path / "run-True"))
