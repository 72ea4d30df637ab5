"""Probe sources: the token streams the length study reads far beyond the training length.

A probe is a spec string (a study's `length.probes`, a run's `probes`, `lctrain eval length --probe`):

- `heldout`            held-out documents of the run's corpus (validation split by doc-id hash, read from
                       the whole source so `data.max_bytes` does not limit it), in a seeded order per
                       sample, joined by a blank line into one stream (no end-of-document token, no state
                       reset); cycled if the pool is short (reported as `wrapped`).
- `documents`          the longest held-out documents, one per sample, each cut at the length.
- `newlines`           the newline token repeated: the strongest collapse probe of "Stuffed Mamba"
                       (Chen et al. 2024, §4). `newlines:prefix=N` starts sample k with N held-out
                       tokens (a different passage per sample), so the samples differ; with no prefix
                       every sample is the same stream and one is evaluated.
- `repeat`             a held-out passage of `period` tokens repeated (`repeat:period=N`, default 64),
                       a different passage per sample: in-distribution text whose content stops being new.
- `file:PATH`          a text file (one document; several files: `file:a.txt,b.txt`), joined like heldout.

Every probe but `file` also takes `samples=N` (e.g. `heldout:samples=16`): its own sample count, so a noisy
probe can get more bootstrap units than a deterministic one.

Parsing does not import torch or read data (recipes validate probes); `build_probe` makes the samples.
"""
from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from lctrain.schema import ConfigError

KINDS = ("heldout", "documents", "newlines", "repeat", "file")


@dataclass(frozen=True)
class Probe:
    name: str                      # canonical spec, e.g. "newlines:prefix=8"
    kind: str
    prefix: int = 0                # newlines: held-out tokens before the newline run
    period: int = 64               # repeat: tokens in the repeated passage
    samples: int = 0               # samples of this probe (0: the length settings' `samples`)
    paths: tuple[str, ...] = ()    # file

    @property
    def needs_heldout(self) -> bool:
        return self.kind in ("heldout", "documents", "repeat") or (self.kind == "newlines" and self.prefix > 0)


def parse_probe(spec: str, path: str = "--probe") -> Probe:
    """`kind` or `kind:opt=value,...` (see module doc); one-line ConfigError naming `path` if bad."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(path, f"expected a probe like {', '.join(KINDS[:-1])} or file:PATH, got {spec!r}")
    text = spec.strip()
    kind, _, rest = text.partition(":")
    if kind not in KINDS:
        raise ConfigError(path, f"unknown probe {kind!r} in {spec!r}; known: {', '.join(KINDS)} (file:PATH)")
    if kind == "file":
        paths = tuple(p for p in rest.split(",") if p)
        if not paths:
            raise ConfigError(path, f"{spec!r}: file needs a path, e.g. file:notes.txt")
        return Probe(f"file:{','.join(paths)}", "file", paths=paths)
    opts = {"newlines": {"prefix"}, "repeat": {"period"}}.get(kind, set()) | {"samples"}
    vals = {}
    for term in filter(None, rest.split(",")):
        k, eq, v = term.partition("=")
        if not eq or k not in opts:
            raise ConfigError(path, f"bad option {term!r} in {spec!r}; {kind} takes "
                                    f"{', '.join(f'{o}=N' for o in sorted(opts)) or 'no options'}")
        try:
            vals[k] = int(v)
        except ValueError:
            raise ConfigError(path, f"{k} must be an integer, got {v!r} in {spec!r}") from None
    if vals.get("prefix", 0) < 0 or vals.get("period", 1) < 1 or vals.get("samples", 1) < 1:
        raise ConfigError(path, f"{spec!r}: prefix must be >= 0, period and samples >= 1")
    canon = kind + (":" + ",".join(f"{k}={v}" for k, v in sorted(vals.items())) if vals else "")
    return Probe(canon, kind, **vals)


def default_probe(source: str) -> str:
    """The probe of the legacy `length.source` setting (concat / document)."""
    return {"concat": "heldout", "document": "documents"}[source]


def describe(probe: Probe) -> str:
    return {"heldout": "held-out documents joined by a blank line into one stream (no end-of-document token, "
                       "no state reset)",
            "documents": "the longest held-out documents, one per sample",
            "newlines": "the newline token repeated" + (f" after {probe.prefix} held-out tokens (a different "
                                                         "passage per sample)" if probe.prefix else ""),
            "repeat": f"a held-out passage of {probe.period} tokens repeated (a different passage per sample)",
            "file": f"text files {', '.join(probe.paths)}, joined by a blank line"}[probe.kind]


def heldout_docs(recipe, tokenizer, need: Optional[int]) -> tuple[list[np.ndarray], str]:
    """Tokenized held-out documents, in corpus order, until `need` tokens are collected (None: all)."""
    from lctrain.data.corpus import split_token_docs
    frac = recipe.data.val_fraction
    if frac <= 0:
        raise ValueError("probe: the run's data.val_fraction is 0, so it has no held-out documents; "
                         "use the newlines or file:PATH probe")
    docs = split_token_docs(recipe.data, tokenizer, validation=True, need=need)
    if not docs:
        raise ValueError("probe: the run's corpus has no held-out documents; use the newlines or file:PATH probe")
    return docs, f"held-out split of the run's corpus (data.source={recipe.data.source}, val_fraction={frac})"


def _file_docs(paths: Sequence[str], tokenizer) -> tuple[list[np.ndarray], str]:
    docs = []
    for p in paths:
        if not os.path.isfile(p):
            raise ValueError(f"probe file: file not found: {p}")
        with open(p, encoding="utf-8", errors="replace") as f:
            ids = np.asarray(tokenizer.encode(f.read()), dtype=np.int32)
        if ids.size:
            docs.append(ids)
    if not docs:
        raise ValueError(f"probe file: {', '.join(paths)} hold no text")
    return docs, f"text files: {', '.join(paths)}"


def newline_id(tokenizer) -> int:
    ids = tokenizer.encode("\n")
    if len(ids) != 1:
        raise ValueError(f"probe newlines: the tokenizer encodes a newline as {len(ids)} pieces, not one")
    return int(ids[0])


def _streams(toks: list[np.ndarray], sep: np.ndarray, T: int, n: int, seed: str) -> tuple[list[np.ndarray], bool]:
    """n streams of T tokens: the docs in a seeded order per stream, joined by `sep`, cycled if short."""
    out, wrapped = [], False
    for k in range(n):
        rng = random.Random(f"{seed}:{k}")
        parts, got, rounds = [], 0, 0
        while got < T:
            perm = list(range(len(toks)))
            rng.shuffle(perm)
            wrapped |= rounds > 0
            rounds += 1
            for i in perm:
                parts += [toks[i], sep]
                got += toks[i].size + sep.size
                if got >= T:
                    break
        out.append(np.concatenate(parts)[:T])
    return out, wrapped


def _passages(toks: list[np.ndarray], sep: np.ndarray, n_tokens: int, n: int, seed: str) -> tuple[list[np.ndarray], bool]:
    """n different passages of n_tokens: consecutive pieces of one held-out stream (seeded order)."""
    (stream,), wrapped = _streams(toks, sep, n * n_tokens, 1, seed)
    return [stream[i * n_tokens:(i + 1) * n_tokens] for i in range(n)], wrapped


def build_probe(probe: Probe, recipe, tokenizer, length: int, samples: int, seed: int = 0
                ) -> tuple[list[np.ndarray], dict]:
    """The probe's token arrays (int32, `length` tokens each; `documents`: up to `length`) and a description
    (JSON-ready: probe, text, documents, pool_tokens, wrapped, sample_tokens, deterministic)."""
    T = length
    from lctrain.data.corpus import DOC_SEPARATOR
    sep = np.asarray(tokenizer.encode(DOC_SEPARATOR), dtype=np.int32)
    info = {"probe": probe.name, "text": describe(probe), "documents": None, "pool_tokens": None,
            "wrapped": False, "deterministic": False}
    if probe.kind == "newlines":
        nl = newline_id(tokenizer)
        if probe.prefix == 0:
            samples_ = [np.full(T, nl, dtype=np.int32)]
            info["deterministic"] = True        # every sample would be the same stream
        else:
            docs, origin = heldout_docs(recipe, tokenizer, samples * probe.prefix)
            streams, info["wrapped"] = _passages(docs, sep, probe.prefix, samples, f"probe-prefix:{seed}")
            samples_ = [np.concatenate([s, np.full(T - probe.prefix, nl, dtype=np.int32)])[:T] for s in streams]
            info["text"] += f"; prefixes from the {origin}"
        info["sample_tokens"] = [int(s.size) for s in samples_]
        return samples_, info
    if probe.kind == "file":
        docs, origin = _file_docs(probe.paths, tokenizer)
    elif probe.kind == "repeat":
        docs, origin = heldout_docs(recipe, tokenizer, samples * probe.period)
    else:
        docs, origin = heldout_docs(recipe, tokenizer, None if probe.kind == "documents" else samples * T)
    info.update(text=f"{info['text']}; {origin}", documents=len(docs), pool_tokens=int(sum(d.size for d in docs)))
    if probe.kind == "documents":
        order = sorted(range(len(docs)), key=lambda i: -docs[i].size)[:samples]
        samples_ = [docs[i][:T] for i in order if docs[i].size >= 2]
    elif probe.kind == "repeat":
        passages, info["wrapped"] = _passages(docs, sep, probe.period, samples, f"probe-repeat:{seed}")
        samples_ = [np.tile(p, -(-T // p.size))[:T] for p in passages]
    else:
        samples_, info["wrapped"] = _streams(docs, sep, T, samples, f"length:{seed}")
    info["sample_tokens"] = [int(s.size) for s in samples_]
    return samples_, info
