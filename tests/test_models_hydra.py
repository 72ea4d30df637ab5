"""Hydra modules: sparse global attention (X), workspace memory (R), product-key memory (P), the
chunk-routed MoE inside LMs (E; its routing details are in test_models_moe.py), the hydra preset and
recipes. References are written here, independently of the implementations (explicit loops)."""
import math
import os
import threading

import pytest
import torch

from lctrain.kernels import attention_reference
from lctrain.models import LanguageModel, SeqContext, build_config
from lctrain.models.layers import apply_rope, rope_tables
from lctrain.models import sparse_attention
from lctrain.models.memory import PKMConfig, ProductKeyMemory, WorkspaceConfig, WorkspaceMemory
from lctrain.models.moe import MoE, MoEConfig
from lctrain.models.seqops import LocalOps
from lctrain.models.sparse_attention import SparseAttentionConfig, SparseGlobalAttention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SMALL = {
    "vocab_size": 64, "d_model": 32,
    "mixers": {"sparse_attention": {"n_heads": 4, "n_kv_heads": 2, "window": 6, "block_size": 4, "top_k": 2,
                                    "query_chunk": 7},
               "workspace": {"n_slots": 6, "slot_dim": 16, "n_heads": 2, "addr_dim": 8, "chunk_size": 4},
               "attention": {"n_heads": 4}},
    "ffns": {"moe": {"n_experts": 4, "top_k": 2, "hidden": 32, "chunk_size": 3, "capacity_factor": 2.0},
             "pkm": {"n_heads": 2, "n_sub_keys": 8, "key_dim": 8, "top_k": 3}},
}
TINY = {
    "sparse": dict(SMALL, n_layers=2, pattern="X", ffn_pattern="S"),
    "workspace": dict(SMALL, n_layers=2, pattern="AR", ffn_pattern="S"),
    "moe_token": dict(SMALL, n_layers=2, pattern="A", ffn_pattern="E"),
    "moe_chunk": dict(SMALL, n_layers=2, pattern="A", ffn_pattern="E",
                      ffns=dict(SMALL["ffns"], moe=dict(SMALL["ffns"]["moe"], routing="chunk"))),
    "pkm": dict(SMALL, n_layers=2, pattern="A", ffn_pattern="P"),
    "all": dict(SMALL, n_layers=4, pattern="XRAX", ffn_pattern="EPES",
                ffns=dict(SMALL["ffns"], moe=dict(SMALL["ffns"]["moe"], routing="chunk"))),
    "hydra": {"arch": "hydra", "vocab_size": 64, "d_model": 32, "n_layers": 12,
              "mixers": {"mamba2": {"d_state": 8, "headdim": 8},
                         "sparse_attention": {"n_heads": 2, "window": 6, "block_size": 4, "top_k": 2},
                         "workspace": {"n_slots": 4, "slot_dim": 16, "n_heads": 2, "addr_dim": 8, "chunk_size": 4}},
              "ffns": {"moe": {"n_experts": 4, "hidden": 32, "chunk_size": 4, "capacity_factor": 2.0},
                       "pkm": {"n_heads": 2, "n_sub_keys": 8, "key_dim": 8, "top_k": 3}}},
}


def tiny_model(name: str) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(build_config(dict(TINY[name])))


def close(a, b, tol=2e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# --- LM-level contracts, every module ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["sparse", "workspace", "moe_token", "moe_chunk", "pkm", "hydra"])
def test_forward_equals_chunked_prefill_and_decode(name):
    model = tiny_model(name).eval()
    ids = torch.randint(0, 64, (2, 29))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.init_cache()
        chunked = torch.cat([model(ids[:, s:s + 5], cache=cache).logits for s in range(0, 29, 5)], 1)
        cache = model.init_cache()
        steps = torch.cat([model(ids[:, s:s + 1], cache=cache).logits for s in range(29)], 1)
        cache = model.init_cache()
        last = model.prefill(ids[:, :23], cache, chunk_size=6)
        gen = model.generate(ids[:, :23], 3)
    close(chunked, full)
    close(steps, full)
    close(last, full[:, 22])
    assert gen.shape == (2, 3)


@pytest.mark.parametrize("name", ["sparse", "workspace", "moe_chunk", "pkm", "hydra"])
def test_packed_documents_are_separate_sequences(name):
    model = tiny_model(name).eval()
    T = 34
    ids = torch.randint(0, 64, (2, T))
    cuts = [[0, 13, T], [0, 6, 23, T]]    # starts not on block/chunk multiples: alignment matters
    ds = torch.zeros(2, T, dtype=torch.bool)
    for b, c in enumerate(cuts):
        ds[b, c[1:-1]] = True
    with torch.no_grad():
        packed = model(ids, SeqContext(doc_start=ds)).logits
        for b, c in enumerate(cuts):
            for s, e in zip(c[:-1], c[1:]):
                close(packed[b:b + 1, s:e], model(ids[b:b + 1, s:e]).logits)


@pytest.mark.parametrize("name", ["all", "hydra"])
def test_gradients_reach_every_parameter(name):
    model = tiny_model(name).train()
    ids = torch.randint(0, 64, (2, 33))
    ds = torch.zeros(2, 33, dtype=torch.bool)
    ds[1, 14] = True
    out = model(ids, SeqContext(doc_start=ds))
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    (loss + 0.01 * out.aux_loss).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not dead, f"no gradient: {dead}"
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_adamw_steps_reduce_loss():
    model = tiny_model("all").train()
    ids = torch.randint(0, 64, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        out = model(ids)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        losses.append(loss.item())
        opt.zero_grad()
        (loss + 0.01 * out.aux_loss).backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.5, losses
    assert any(k.startswith("moe_balance/") for k in out.stats)


# --- sparse global attention -----------------------------------------------------------------------

def _qkv(mixer, x):
    """The mixer's own projections and RoPE: (q, k rotated; q, k before RoPE; v)."""
    B, T, _ = x.shape
    H, Hkv, hd = mixer.n_heads, mixer.n_kv, mixer.head_dim
    q, k, v = mixer.qkv_proj(x).split([H * hd, Hkv * hd, Hkv * hd], -1)
    q, k, v = q.view(B, T, H, hd), k.view(B, T, Hkv, hd), v.view(B, T, Hkv, hd)
    cos, sin = rope_tables(torch.arange(T), hd)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), q, k, v


def ref_sparse_attention(q, k, q_raw, k_raw, v, doc_start, W, L, top_k):
    """Per query: window keys + keys of the top_k complete, not-window-covered earlier blocks of its
    document (blocks counted from the document start, scored by the group's summed q . mean key)."""
    B, T, H, D = q.shape
    G = H // k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        starts = [0] + [t for t in range(1, T) if doc_start is not None and bool(doc_start[b, t])]
        ends = starts[1:] + [T]
        doc = [max(s for s in starts if s <= t) for t in range(T)]
        blocks = [(s, j) for s, e in zip(starts, ends) for j in range(s, e - L + 1, L)]
        for i in range(T):
            for h in range(H):
                g = h // G
                keys = set(range(max(doc[i], i - W + 1), i + 1))
                cands = [j for s, j in blocks if s == doc[i] and j + L - 1 <= i and j <= i - W]
                qs = q_raw[b, i, g * G:(g + 1) * G].sum(0)
                cands.sort(key=lambda j: -float(qs @ k_raw[b, j:j + L, g].mean(0)))
                for j in cands[:top_k]:
                    keys |= set(range(j, j + L))
                idx = sorted(keys)
                p = (k[b, idx, g] @ q[b, i, h] * D ** -0.5).softmax(0)
                out[b, i, h] = p @ v[b, idx, g]
    return out


@pytest.mark.parametrize("union", [0, 1000])       # each query gathers its blocks / a chunk scores their union
@pytest.mark.parametrize("W,L,top_k,docs", [(5, 4, 2, True), (3, 5, 1, False), (8, 3, 3, True)])
def test_sparse_attention_matches_dense_reference(W, L, top_k, docs, union, monkeypatch):
    monkeypatch.setattr(sparse_attention, "UNION_FACTOR", union)
    cfg = SparseAttentionConfig(n_heads=4, n_kv_heads=2, window=W, block_size=L, top_k=top_k, query_chunk=7)
    mixer = SparseGlobalAttention(32, cfg, 0, None)
    B, T = 2, 40
    x = torch.randn(B, T, 32)
    ds = None
    if docs:
        ds = torch.zeros(B, T, dtype=torch.bool)
        ds[1, 17] = ds[1, 30] = True
    with torch.no_grad():
        got = mixer(x, SeqContext(doc_start=ds))
        qr, kr, q, k, v = _qkv(mixer, x)
        o = ref_sparse_attention(qr, kr, q, k, v, ds, W, L, top_k)
        want = mixer.out_proj(o.reshape(B, T, -1))
    close(got, want, 1e-5)
    # the training path (per-chunk recompute in backward) computes the same
    close(mixer(x.requires_grad_(), SeqContext(doc_start=ds)).detach(), want, 1e-5)


def test_sparse_attention_limits_are_window_and_full_attention():
    torch.manual_seed(1)
    x = torch.randn(1, 45, 32)
    for top_k, W, ref_window in [(0, 7, 7), (100, 8, None)]:   # k = 0: window only; k >= blocks, W >= L: full
        mixer = SparseGlobalAttention(32, SparseAttentionConfig(n_heads=4, window=W, block_size=4, top_k=top_k), 0, None)
        with torch.no_grad():
            qr, kr, _, _, v = _qkv(mixer, x)
            want = mixer.out_proj(attention_reference(qr, kr, v, window=ref_window).reshape(1, 45, -1))
            close(mixer(x, SeqContext()), want, 1e-5)


# --- workspace memory ---------------------------------------------------------------------------------

def ref_workspace(m: WorkspaceMemory, x, doc_start):
    """Explicit loop: per document, per chunk: tokens read the slots, then a complete chunk writes."""
    c = m.config
    C, A, S, H = c.chunk_size, m.A, m.S, c.n_heads
    dh = S // H
    B, T, _ = x.shape
    p, q, g = m.write_proj(x), m.q_proj(x), torch.sigmoid(m.gate_proj(x))
    r = torch.zeros(B, T, S)
    for b in range(B):
        starts = [0] + [t for t in range(1, T) if doc_start is not None and bool(doc_start[b, t])]
        for s, e in zip(starts, starts[1:] + [T]):
            slots = m.slot_init.clone()
            for c0 in range(s, e, C):
                for t in range(c0, min(c0 + C, e)):
                    for h in range(H):
                        Wh = slots[:, h * dh:(h + 1) * dh]
                        r[b, t, h * dh:(h + 1) * dh] = (Wh @ q[b, t, h * dh:(h + 1) * dh] / math.sqrt(dh)).softmax(0) @ Wh
                if c0 + C <= e:
                    u = p[b, c0:c0 + C].mean(0)
                    addr, val, strength = u[:A], u[A:A + S], u[A + S]
                    w = torch.sigmoid(strength) * (m.slot_keys @ addr / math.sqrt(A)).softmax(0)
                    slots = (1 - w[:, None]) * slots + w[:, None] * val[None, :]
    return m.out_proj(g * r)


def test_workspace_matches_reference():
    m = WorkspaceMemory(24, WorkspaceConfig(n_slots=5, slot_dim=12, n_heads=3, addr_dim=6, chunk_size=4), 0, None)
    x = torch.randn(2, 31, 24)
    ds = torch.zeros(2, 31, dtype=torch.bool)
    ds[1, 10] = ds[1, 13] = True
    with torch.no_grad():
        close(m(x, SeqContext(doc_start=ds)), ref_workspace(m, x, ds), 1e-5)


def test_workspace_is_causal_across_chunks():
    """Perturbing token t changes nothing before t nor in the rest of t's chunk (tokens read only what
    earlier chunks wrote), and changes every token of the chunks after it."""
    C = 4
    m = WorkspaceMemory(16, WorkspaceConfig(n_slots=4, slot_dim=16, n_heads=2, addr_dim=8, chunk_size=C), 0, None)
    x = torch.randn(1, 24, 16)
    with torch.no_grad():
        base = m(x, SeqContext())
        for t in (0, 5, 10, 19):
            x2 = x.clone()
            x2[0, t] += 3.0
            diff = (m(x2, SeqContext()) - base).abs().amax(-1)[0]
            end = (t // C + 1) * C
            assert float(diff[:t].abs().sum()) == 0.0 and float(diff[t + 1:end].abs().sum()) == 0.0, t
            assert bool((diff[end:] > 1e-6).all()), t


# --- product-key memory ----------------------------------------------------------------------------

def ref_pkm(m: ProductKeyMemory, x):
    """Per token and head: all n^2 product-key scores, the top_k x top_k candidates of the sub-key
    top-k, softmax over them, weighted values; heads add up; sigmoid gate."""
    c = m.config
    n, k, dk = c.n_sub_keys, c.top_k, c.key_dim
    B, T, D = x.shape
    q = m.query(x).view(B, T, c.n_heads, dk)
    q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + m.eps) * m.q_norm_weight
    out = torch.zeros(B, T, D)
    for b in range(B):
        for t in range(T):
            for h in range(c.n_heads):
                s1 = m.sub_keys[h, 0] @ q[b, t, h, :dk // 2]
                s2 = m.sub_keys[h, 1] @ q[b, t, h, dk // 2:]
                full = s1[:, None] + s2[None, :]
                top1, top2 = s1.argsort(descending=True)[:k], s2.argsort(descending=True)[:k]
                cand = [(int(i), int(j)) for i in top1 for j in top2]
                scores = torch.stack([full[i, j] for i, j in cand])
                assert float(scores.max()) == float(full.max())    # the product-key property
                w = scores.softmax(0)
                out[b, t] += sum(w[a] * m.values[i * n + j] for a, (i, j) in enumerate(cand))
    return torch.sigmoid(m.gate(x)) * out


def test_pkm_matches_reference():
    class Lm:
        norm_eps, init_std = 1e-5, 0.02
    m = ProductKeyMemory(16, PKMConfig(n_heads=2, n_sub_keys=6, key_dim=8, top_k=3), Lm)
    torch.nn.init.normal_(m.gate.weight)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        close(m(x), ref_pkm(m, x), 1e-5)
    assert m.inactive_params() == (36 - 2 * 9) * 16


# --- sequence parallel: the same calls on contiguous shards -------------------------------------------

class ThreadSP(LocalOps):
    """In-process stand-in for a sequence-parallel group: one thread per rank, gather_sequence by
    exchanging tensors (forward only). Enough to check the modules' SP logic (offsets, frames, halos)."""

    def __init__(self, size, rank, shared):
        self.sp_size, self.sp_rank, self.shared = size, rank, shared

    def position_offset(self, local_len):
        return self.sp_rank * local_len

    def gather_sequence(self, x, dim=1):
        slots, barrier = self.shared
        slots[self.sp_rank] = x
        barrier.wait()
        out = torch.cat(slots, dim)
        barrier.wait()
        return out


def run_sp(module, x, ds, P):
    T = x.shape[1] // P
    shared = ([None] * P, threading.Barrier(P, timeout=60))
    outs, errors = [None] * P, []

    def rank(r):
        try:
            sl = slice(r * T, (r + 1) * T)
            ctx = SeqContext(doc_start=None if ds is None else ds[:, sl], ops=ThreadSP(P, r, shared),
                             position_offset=r * T)
            with torch.no_grad():
                outs[r] = module(x[:, sl], ctx)
        except Exception as e:  # surfaced below
            errors.append(e)
            shared[1].abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(P)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    if errors:
        raise errors[0]
    return torch.cat(outs, 1)


def test_sequence_parallel_shards_equal_full_forward():
    torch.manual_seed(3)

    class Lm:
        ffn_mult, init_std, n_layers = 8 / 3, 0.02, 2
    modules = [
        SparseGlobalAttention(32, SparseAttentionConfig(n_heads=4, n_kv_heads=2, window=5, block_size=4, top_k=2), 0, None),
        WorkspaceMemory(32, WorkspaceConfig(n_slots=4, slot_dim=16, n_heads=2, addr_dim=8, chunk_size=5), 0, None),
        MoE(32, MoEConfig(n_experts=4, top_k=2, hidden=16, routing="chunk", chunk_size=5), Lm).eval(),
    ]
    x = torch.randn(2, 36, 32)
    ds = torch.zeros(2, 36, dtype=torch.bool)
    ds[0, 11] = ds[1, 24] = ds[1, 26] = True
    for mod in modules:
        with torch.no_grad():
            full = mod(x, SeqContext(doc_start=ds))
        close(run_sp(mod, x, ds, 3), full, 1e-5)
        close(run_sp(mod, x, None, 2), mod(x, SeqContext()).detach(), 1e-5)


# --- hydra preset and recipes ---------------------------------------------------------------------------

def _meta_model(path):
    from lctrain.config import load_recipe
    recipe = load_recipe(os.path.join(ROOT, path))
    recipe.model.vocab_size = recipe.model.vocab_size or recipe.tokenizer.vocab_size   # as `lctrain info`
    with torch.device("meta"):
        return recipe, LanguageModel(recipe.model)


def test_hydra_1p6b_parameter_count():
    recipe, model = _meta_model("recipes/hydra-1.6b.yaml")
    cfg = recipe.model
    assert cfg.arch == "hydra" and set(cfg.pattern) == {"M", "X", "R"} and set(cfg.ffn_pattern) == {"E", "P"}
    total, active = model.num_params(), model.num_params(active=True)
    assert 1.52e9 <= total <= 1.68e9, total
    moe, pkm, d = cfg.ffns["moe"], cfg.ffns["pkm"], cfg.d_model
    letters = [f for _, f in cfg.layer_letters()]
    unused = (letters.count("E") * (moe.n_experts - moe.top_k) * 3 * d * moe.hidden
              + letters.count("P") * (pkm.n_sub_keys ** 2 - pkm.n_heads * pkm.top_k ** 2) * d)
    assert active == total - unused
    assert model.flops_per_token(4096) > 0 and model.state_elements(4096) > 0


@pytest.mark.parametrize("path", ["recipes/hydra-cpu.yaml", "recipes/hybrid-cpu.yaml"])
def test_cpu_recipes_build(path):
    recipe, model = _meta_model(path)
    assert model.num_params(active=True) < model.num_params()
