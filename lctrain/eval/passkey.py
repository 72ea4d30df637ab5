"""`lctrain eval passkey`: the standard passkey-retrieval grid (context length x needle depth).

For every cell, `samples` prompts with random 5-digit keys (seeded by the cell, so every model sees
the same prompts) are built at exactly the requested token length (lctrain/data/passkey.py; the haystack
is the repeated sentences or, with `haystack: text`, windows of held-out text), prefilled
in chunks (memory bounded for linear models) and greedily decoded for `max_new_tokens` tokens; a
sample is correct when the first number in the decoded output equals the key. Prompts of one cell
that have the same token length are decoded as one batch.
"""
from __future__ import annotations

import random
import time
from collections import defaultdict
from typing import Callable, Optional

import numpy as np
import torch

from lctrain.config import PasskeyEvalConfig
from lctrain.data.passkey import CHANCE, NAMES, first_number, haystack_stream, make_builder, random_key
from lctrain.eval.progress import Progress
from lctrain.models import InferenceKnobs, LanguageModel
from lctrain.schema import ConfigError


def check_lengths(builder, lengths, path: str = "--lengths") -> None:
    """One-line ConfigError naming `path` for a length the builder cannot fill: shorter than the prompt
    without haystack, or (keyed needles) needing more needles than there are names."""
    fixed = builder.fixed_tokens()
    every = getattr(builder, "needle_every", 0)
    for n in lengths:
        if n < fixed:
            raise ConfigError(path, f"{n} tokens is shorter than the passkey prompt without any filler "
                                    f"({fixed} tokens with this tokenizer{' and the preamble' if builder.preamble else ''})")
        if every and n // every > len(NAMES):
            raise ConfigError(path, f"{n} tokens at one keyed needle per {every} tokens needs {n // every} needles, "
                                    f"more than the {len(NAMES)} names (at most {every * len(NAMES)} tokens)")


def prompt_settings(recipe, tokenizer, cfg: PasskeyEvalConfig, preamble: Optional[bool] = None,
                    haystack: Optional[str] = None) -> dict:
    """The preamble and haystack an evaluation uses: the arguments, else `cfg`'s, else the run's training
    data (`data.passkey`). For the text haystack, the held-out split of the run's corpus as one token
    stream (4x the longest prompt when the split holds that much). Returns keyword arguments for
    `evaluate_passkey`; raises ValueError when the run's corpus has no held-out text."""
    pre = next(v for v in (preamble, cfg.preamble, recipe.data.passkey.preamble) if v is not None)
    kind = next(v for v in (haystack, cfg.haystack, recipe.data.passkey.haystack) if v is not None)
    every = next(v for v in (cfg.needle_every, recipe.data.passkey.needle_every) if v is not None)
    stream = None
    if kind == "text":
        stream = haystack_stream(recipe.data, tokenizer, validation=True, need=4 * max(cfg.lengths))
    return {"preamble": pre, "haystack": kind, "haystack_stream": stream, "needle_every": every}


@torch.no_grad()
def evaluate_passkey(model: LanguageModel, tokenizer, cfg: PasskeyEvalConfig, *, preamble: bool = True,
                     haystack: str = "repeat", haystack_stream=None, needle_every: int = 0,
                     knobs: Optional[InferenceKnobs] = None,
                     log: Callable[[str], None] = lambda m: None, label: str = "") -> dict:
    """Accuracy grid [depth][length] plus every sample's record. `haystack_stream` (1-D token ids, the
    `text` haystack; see `prompt_settings`) replaces the repeated sentences; `haystack` names it."""
    if (haystack == "text") != (haystack_stream is not None):
        raise ValueError(f"passkey: haystack {haystack!r} needs {'a' if haystack == 'text' else 'no'} haystack_stream")
    builder = make_builder(tokenizer, preamble, haystack_stream, needle_every)
    check_lengths(builder, cfg.lengths)
    device = next(model.parameters()).device
    eod = tokenizer.eod_id
    acc = np.zeros((len(cfg.depths), len(cfg.lengths)))
    records = []
    t0 = time.perf_counter()
    prog = Progress(sum(cfg.lengths) * len(cfg.depths) * cfg.samples, f"{label + ': ' if label else ''}passkey", log=log)
    for li, L in enumerate(cfg.lengths):
        for di, depth in enumerate(cfg.depths):
            rng = random.Random(f"passkey-eval:{cfg.seed}:{L}:{depth}")
            prompts = [builder.build(L, depth, random_key(rng), rng) for _ in range(cfg.samples)]
            groups: dict[int, list[int]] = defaultdict(list)
            for i, p in enumerate(prompts):
                groups[p.n_tokens].append(i)
            outputs: list[str] = [""] * len(prompts)
            for _, idx in sorted(groups.items()):
                ids = torch.tensor([prompts[i].ids for i in idx], dtype=torch.long, device=device)
                new = model.generate(ids, cfg.max_new_tokens, prefill_chunk=cfg.chunk_size, knobs=knobs,
                                     eos_id=eod)
                for row, i in enumerate(idx):
                    toks = new[row].tolist()
                    if eod in toks:
                        toks = toks[:toks.index(eod)]
                    outputs[i] = tokenizer.decode(toks)
            correct = 0
            for p, out in zip(prompts, outputs):
                ans = first_number(out)
                ok = ans == p.key
                correct += ok
                records.append({"length": L, "depth": depth, "tokens": p.n_tokens,
                                "needle_depth": round(p.needle_depth, 4), "key": p.key, "output": out,
                                "answer": ans, "correct": bool(ok)})
            acc[di, li] = correct / len(prompts)
            prog.update(L * len(prompts))
        prog.close()
        log(f"passkey length {L}: accuracy {acc[:, li].mean():.3f} over depths "
            f"({time.perf_counter() - t0:.1f}s)")
    return {"lengths": list(cfg.lengths), "depths": list(cfg.depths), "samples": cfg.samples,
            "max_new_tokens": cfg.max_new_tokens, "chunk_size": cfg.chunk_size, "preamble": preamble,
            "haystack": haystack, "needle_every": needle_every,
            "seed": cfg.seed, "chance": CHANCE,
            "accuracy": acc.tolist(), "accuracy_by_length": acc.mean(0).tolist(),
            "accuracy_by_depth": acc.mean(1).tolist(), "overall": float(acc.mean()),
            "seconds": time.perf_counter() - t0, "records": records}
