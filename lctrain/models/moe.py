"""Mixture-of-experts FFN, letter E: SwiGLU experts, top-k routing with a capacity limit and the
Switch/GShard load-balancing loss; token-level or chunk-level (Hydra) routing. Options:
`model.ffns.moe` (MoEConfig).

Routing. The router is a linear map to n_experts logits (fp32); the gates are the top_k softmax
probabilities, renormalised to sum to 1 (`normalize_gates`).
- `token`: each token picks its own top_k experts.
- `chunk`: every document is cut into chunks of C tokens counted from its first token, and all
  tokens of a chunk share one decision made from mean router logits (= the logits of the mean hidden
  state: the router is linear). Routing a chunk by the mean of its *own* tokens would make a token's
  expert choice and gate depend on later tokens: a leak of the future in a causal LM, which decoding
  could not reproduce. So chunk c (tokens [cC, cC + C)) is routed by the mean over the C tokens
  ending at its first token, [cC - C + 1, cC], clipped to the document (the first chunk by its first
  token): the latest C tokens that every token of the chunk can see.

Capacity. Each expert takes at most ceil(capacity_factor * tokens * top_k / n_experts) assignments
per forward call (a GShard group: this rank's micro-batch part); later ones are dropped (the token
gets nothing from that expert; the residual carries it). Priority is (batch row, position, choice
rank), so whether a token is dropped depends only on tokens before it: no leak of the future.
`capacity_factor` applies in training, `eval_capacity_factor` (default 0 = no limit) otherwise, so
inference never drops and decoding equals the full forward.

Only routed experts compute: assignments are sorted by expert (stable) and each expert runs its
SwiGLU on its gathered kept tokens; outputs are scattered back weighted by the gates.

Load balancing (Switch Transformer eq. 4 / GShard): aux = E * sum_e f_e * P_e, with f_e the
fraction of the tokens x top_k assignments routed to e (before dropping) and P_e the mean router
probability of e; it is 1 for a uniform router. `self.aux_loss` holds it (the trainer weights it by
train.aux_loss_weight); `self.stats`: moe_balance (= aux), moe_dropped (fraction of assignments
dropped), moe_max_load (max_e E f_e, 1 when balanced).

Sequence parallel: chunk routing needs the router logits of up to C - 1 tokens before a rank's part,
so the logits (n_experts numbers per token) are gathered with `ctx.ops.gather_sequence`. Capacity
groups are per rank, so when tokens are dropped SP results differ from one process (as with data
parallelism); without drops they are equal. Decoding (chunk routing): `cache["logits"]` keeps the
router logits since the start of the next token's routing window (< 2C tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lctrain.models.base import FFN_CONFIGS, FFNS, SeqContext
from lctrain.models.hydra import doc_layout, sequence_frame
from lctrain.models.layers import swiglu_hidden
from lctrain.models.recurrent import check_cache_docs
from lctrain.schema import require


@dataclass
class MoEConfig:
    n_experts: int = 8
    top_k: int = 2
    hidden: int = 0                      # expert SwiGLU hidden size; 0: the model's SwiGLU size (ffn_mult)
    capacity_factor: float = 1.25        # training; 0 = no limit
    eval_capacity_factor: float = 0.0    # eval / inference; 0 = no limit (decoding = full forward)
    routing: Literal["token", "chunk"] = "token"
    chunk_size: int = 64                 # C for chunk routing
    normalize_gates: bool = True         # renormalise the top_k probabilities to sum to 1

    def validate(self, path):
        require(self.n_experts >= 1, f"{path}.n_experts", f"must be >= 1, got {self.n_experts}")
        require(1 <= self.top_k <= self.n_experts, f"{path}.top_k",
                f"must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        require(self.hidden >= 0, f"{path}.hidden", f"must be >= 0, got {self.hidden}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            require(getattr(self, name) >= 0, f"{path}.{name}", f"must be >= 0, got {getattr(self, name)}")
        require(self.chunk_size >= 1, f"{path}.chunk_size", f"must be >= 1, got {self.chunk_size}")


class MoE(nn.Module):
    uses_cache = True          # chunk routing looks back (base.Block passes a decoding-state dict)

    def __init__(self, d_model: int, config: MoEConfig, lm):
        super().__init__()
        self.config = config
        E = config.n_experts
        self.hidden = config.hidden or swiglu_hidden(d_model, lm.ffn_mult)
        self.router = nn.Linear(d_model, E, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(E, d_model, 2 * self.hidden))   # per expert: x @ w
        self.w_down = nn.Parameter(torch.empty(E, self.hidden, d_model))
        self._std, self._out_std = lm.init_std, lm.init_std / math.sqrt(2 * lm.n_layers)
        self.aux_loss: Optional[Tensor] = None
        self.stats: dict = {}
        self.init_weights()

    def init_weights(self):
        nn.init.normal_(self.w_gate_up, std=self._std)
        nn.init.normal_(self.w_down, std=self._out_std)      # like every out_proj

    def inactive_params(self) -> int:
        """Expert parameters a token does not use (it runs top_k of n_experts experts)."""
        per_expert = self.w_gate_up[0].numel() + self.w_down[0].numel()
        return (self.config.n_experts - self.config.top_k) * per_expert

    def route(self, x: Tensor, ctx: SeqContext, cache: Optional[dict] = None):
        """(router probabilities [B*T, E] fp32, gates [B*T, k], experts [B*T, k])."""
        logits = self.router(x).float()
        if self.config.routing == "chunk":
            logits = self._chunk_logits(logits, ctx, cache)
        probs = logits.softmax(-1).flatten(0, 1)
        gates, experts = probs.topk(self.config.top_k, dim=-1)
        if self.config.normalize_gates:
            gates = gates / gates.sum(-1, keepdim=True)
        return probs, gates, experts

    def forward(self, x: Tensor, ctx: Optional[SeqContext] = None, cache: Optional[dict] = None) -> Tensor:
        c = self.config
        B, T, D = x.shape
        E, K = c.n_experts, c.top_k
        probs, gates, experts = self.route(x, ctx or SeqContext(), cache)
        n = B * T * K
        cf = c.capacity_factor if self.training else c.eval_capacity_factor
        cap = math.ceil(cf * n / E) if cf > 0 else n
        assign = experts.reshape(-1)                     # (row, position, choice) order = priority
        order = torch.argsort(assign, stable=True)       # grouped by expert, priority kept inside
        counts = torch.bincount(assign, minlength=E)
        kept = counts.clamp(max=cap)
        xf, gf = x.reshape(B * T, D), gates.reshape(-1)
        out = torch.zeros(B * T, D, dtype=x.dtype, device=x.device)
        start = 0
        for e, (cnt, kp) in enumerate(zip(counts.tolist(), kept.tolist())):
            if kp:
                a = order[start:start + kp]              # the expert's first `cap` assignments
                tok = a // K
                g, u = (xf[tok] @ self.w_gate_up[e]).chunk(2, dim=-1)
                y = (F.silu(g) * u) @ self.w_down[e]
                out.index_add_(0, tok, (y * gf[a, None].to(y.dtype)).to(out.dtype))
            start += cnt
        f = counts.to(torch.float32) / n
        self.aux_loss = E * (f * probs.mean(0)).sum()
        self.stats = {"moe_balance": float(self.aux_loss.detach()), "moe_dropped": float((counts - kept).sum()) / n,
                      "moe_max_load": float(f.max()) * E}
        return out.view(B, T, D)

    def _chunk_logits(self, logits: Tensor, ctx: SeqContext, cache: Optional[dict]) -> Tensor:
        """Per token, the mean router logits of its chunk's routing window (module doc)."""
        C = self.config.chunk_size
        B, T, E = logits.shape
        dev = logits.device
        if cache is None:
            (frame,), ds, q_off = sequence_frame(ctx, T, logits)
            rel = doc_layout(ds, B, frame.shape[1], dev)[1]
        else:   # one document per row from global position 0; the frame starts at pos0
            check_cache_docs(ctx)
            prev = cache.get("logits")
            frame = logits if prev is None else torch.cat([prev, logits], 1)
            q_off = frame.shape[1] - T
            pos0 = ctx.position_offset - q_off
            rel = (torch.arange(frame.shape[1], device=dev) + pos0).expand(B, -1)
        idx = torch.arange(q_off, frame.shape[1], device=dev)     # the local (new) tokens
        rel = rel[:, q_off:]
        s = idx - rel % C                                 # frame index of each token's chunk start
        lo = torch.maximum(s - C + 1, idx - rel).clamp(min=0)   # window start, clipped to the document
        # window sums as differences of an fp64 prefix sum: exact enough that the frames of the full
        # forward and of decoding give the same fp32 means
        cs = F.pad(frame.double().cumsum(1), (0, 0, 1, 0))
        take = lambda j: cs.gather(1, j[..., None].expand(-1, -1, E))
        win = (take(s + 1) - take(lo)) / (s - lo + 1)[..., None].double()
        if cache is not None:
            nxt = ctx.position_offset + T                 # the next token's routing window starts here
            keep_from = max(nxt - nxt % C - C + 1, 0)
            cache["logits"] = frame[:, keep_from - pos0:].detach()
        return win.float()


FFN_CONFIGS["moe"] = MoEConfig
FFNS["E"] = lambda d, cfg, i: MoE(d, cfg.ffns["moe"], cfg)
