"""Tokenized, packed training data with document boundaries and a resumable, seeded order.

1. `prepare_data` resolves the tokenizer (the recipe's file, or one trained on the data and cached),
   then tokenizes every document once (`data.num_workers` processes, same bytes for any count) into a
   token cache: the Megatron indexed datasets `train` / `val` (`.bin` + `.idx`, written by
   megatron-core, readable by Megatron-LM; each document followed by the end-of-document token),
   written atomically. `data.source: megatron` reads existing indexed datasets in place instead.
2. `PackedSequences` cuts a stream into fixed-length sequences `stream[i*L : i*L + L + 1]` (inputs and
   next-token labels) and marks `doc_start[t]` where a document of the index starts, so mixers reset
   their state exactly at document starts (also across sequence shards).
3. `DataOrder` maps a global sequence position (how many sequences were consumed so far: the data
   position a checkpoint saves) to a sequence index, via one seeded permutation per epoch.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from lctrain.config import DataConfig, Recipe
from lctrain.data.corpus import corpus_bytes, corpus_fingerprint, is_validation, iter_documents
from lctrain.data.tokenizer import Tokenizer, train_tokenizer
from lctrain.schema import to_dict
from lctrain.tempfiles import clean_dead_temps, temp_path

# Extra document sources mixed into pretraining (e.g. synthetic passkey documents), by recipe:
# each takes (recipe, tokenizer-free) and yields (doc_id, text). Registered by lctrain.data modules.
EXTRA_SOURCES: dict[str, Callable[[Recipe], Iterator[tuple[str, str]]]] = {}


def cache_root(cfg: DataConfig) -> str:
    """The tokenizer / token cache directory. Its files are trusted (reused by name), so a directory
    other users can write to (world-writable, e.g. /tmp itself, or owned by another user) is refused."""
    root = os.path.expanduser(cfg.cache_dir or os.environ.get("LCTRAIN_CACHE", "~/.cache/lctrain"))
    if os.path.isdir(root):
        st = os.stat(root)
        if st.st_mode & 0o002 or st.st_uid not in (os.getuid(), 0):
            from lctrain.schema import ConfigError
            raise ConfigError("data.cache_dir", f"{root} can be written by other users (mode {st.st_mode & 0o7777:o}, "
                                                f"owner uid {st.st_uid}): files planted there would be trusted; use a "
                                                f"private directory (e.g. a subdirectory with chmod 700)")
    return root


def _tokenizer_extras(recipe: Recipe) -> list[str]:
    """Text the active extra sources add to tokenizer training (an extra source may define
    `fn.tokenizer_text(recipe) -> list[str]`, e.g. the passkey protocol's sentences so that its words
    are single pieces); empty unless a source is active."""
    out: list[str] = []
    for name in sorted(EXTRA_SOURCES):
        fn = getattr(EXTRA_SOURCES[name], "tokenizer_text", None)
        if fn is not None:
            out.extend(fn(recipe))
    return out


def tokenizer_path(recipe: Recipe) -> str:
    """Where the recipe's tokenizer lives (it may not exist yet)."""
    if recipe.tokenizer.path:
        return os.path.expanduser(recipe.tokenizer.path)
    t = recipe.tokenizer
    extras = _tokenizer_extras(recipe)
    tag = "-x" + hashlib.sha1("\0".join(extras).encode()).hexdigest()[:8] if extras else ""
    name = f"{corpus_fingerprint(recipe.data)}-bpe{t.vocab_size}-{t.train_bytes}{tag}.model"
    return os.path.join(cache_root(recipe.data), "tokenizers", name)


def tokenizer_training_texts(recipe: Recipe) -> Iterator[str]:
    """What the recipe's tokenizer is trained on: extra sources' text, then the training documents."""
    return itertools.chain(_tokenizer_extras(recipe),
                           (text for doc_id, text in iter_documents(recipe.data)
                            if not is_validation(doc_id, recipe.data.val_fraction)))


def ensure_tokenizer(recipe: Recipe, log: Callable[[str], None] = print) -> Tokenizer:
    """The recipe's sentencepiece tokenizer: `tokenizer.path`, else the cached BPE trained on the data
    (trained now if missing). Raises TokenizerError (unreadable model, data too small for vocab_size)."""
    path = tokenizer_path(recipe)
    if os.path.isfile(path):
        return Tokenizer(path)
    log(f"training a {recipe.tokenizer.vocab_size}-piece BPE tokenizer on the data -> {path}")
    return train_tokenizer(tokenizer_training_texts(recipe), path, recipe.tokenizer.vocab_size,
                           recipe.tokenizer.train_bytes)


def _file_sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:12]


def _documents(recipe: Recipe) -> Iterator[tuple[str, str]]:
    yield from iter_documents(recipe.data)
    for name, source in EXTRA_SOURCES.items():
        yield from source(recipe)


def token_cache_dir(recipe: Recipe, tok: Tokenizer) -> str:
    """`<cache>/tokens/<key>`: key = sha1 of the cache format version, the corpus fingerprint, the
    tokenizer file and the active extra sources with their options (16 hex digits)."""
    # the passkey source adds nothing (and so changes no key) unless data.passkey.docs > 0
    mixing = recipe.data.passkey.docs > 0
    extras = ",".join(sorted(n for n in EXTRA_SOURCES if n != "passkey" or mixing))
    mix = to_dict(recipe.data.passkey) if mixing else {}   # the options the extra sources read
    key = hashlib.sha1(f"{CACHE_VERSION}|{corpus_fingerprint(recipe.data)}|{_file_sha(tok.path)}|{extras}|"
                       f"{json.dumps(mix, sort_keys=True, default=str)}".encode()).hexdigest()[:16]
    return os.path.join(cache_root(recipe.data), "tokens", key)


# Bump when the cache's layout changes: it is part of the cache key, so an old cache is never misread.
CACHE_VERSION = "megatron-indexed-1"
SPLITS = ("train", "val")


def num_workers(cfg: DataConfig) -> int:
    return cfg.num_workers or max(1, min(8, os.cpu_count() or 1))


_WORKER_TOK: Optional[Tokenizer] = None


def _worker_init(path: str):
    global _WORKER_TOK
    _WORKER_TOK = Tokenizer(path)


def _encode(batch: list[tuple[str, str]], tok: Optional[Tokenizer] = None) -> list[np.ndarray]:
    """Token ids of each document, end-of-document token appended (int32 arrays: cheap to pickle)."""
    tok = tok or _WORKER_TOK
    eod = tok.eod_id
    return [np.asarray(ids + [eod], dtype=np.int32) for ids in tok.encode_batch([t for _, t in batch], threads=1)]


def _batches(docs: Iterable[tuple[str, str]], max_docs: int = 64, max_chars: int = 1 << 20):
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc[1])
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encoded_documents(docs: Iterable[tuple[str, str]], tok: Tokenizer, workers: int
                      ) -> Iterator[tuple[list[tuple[str, str]], list[np.ndarray]]]:
    """(batch of (doc_id, text), their token ids) in document order, tokenized by `workers` processes.

    The order of the output never depends on `workers` (results are taken in submission order), so
    anything written from it is byte-identical for any worker count. At most 4 batches per worker are
    in flight (bounded memory on corpora larger than RAM)."""
    if workers <= 1:
        for batch in _batches(docs):
            yield batch, _encode(batch, tok)
        return
    import collections
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    # fork: workers inherit the loaded modules (spawn would re-import torch in each); they only run sentencepiece
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    # ProcessPoolExecutor, not multiprocessing.Pool: a worker that dies (OOM killer, SIGKILL) breaks the
    # pool with an error instead of leaving its batch's result pending forever
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(tok.path,))
    try:
        pending: collections.deque = collections.deque()
        for batch in _batches(docs):
            pending.append((batch, pool.submit(_encode, batch)))
            if len(pending) >= 4 * workers:
                b, res = pending.popleft()
                yield b, res.result()
        while pending:
            b, res = pending.popleft()
            yield b, res.result()
    except BrokenProcessPool:
        raise RuntimeError("data: a tokenization worker died (killed, e.g. by the out-of-memory killer?); "
                           "nothing was written to the token cache (fewer data.num_workers use less memory)") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Progress:
    """Tokenization progress: a bar (documents, tokens, tokens/s, ETA from text bytes) on a terminal, a
    plain line every 30 s otherwise."""

    def __init__(self, total_bytes: Optional[int], log: Callable[[str], None], enabled: bool, force_bar: bool = False):
        import sys
        import time
        self.time, self.log, self.t0, self.last = time.perf_counter, log, time.perf_counter(), time.perf_counter()
        self.docs = self.tokens = self.bytes = 0
        self.total = total_bytes
        self.bar = None
        if enabled and (force_bar or sys.stderr.isatty()):
            from tqdm import tqdm
            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", leave=False,
                            dynamic_ncols=True)

    def update(self, docs: int, tokens: int, nbytes: int):
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
        now = self.time()
        rate = self.tokens / max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(f"docs={self.docs:,} tokens={self.tokens:,} tok/s={rate:,.0f}", refresh=False)
        elif now - self.last >= 30:
            self.last = now
            eta = ""
            if self.total and self.bytes:
                eta = f", ETA {max(0.0, (self.total - self.bytes) * (now - self.t0) / self.bytes):.0f}s"
            self.log(f"tokenizing: {self.docs:,} docs, {self.tokens:,} tokens, {rate:,.0f} tok/s{eta}")

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
        return self.time() - self.t0


def build_token_cache(recipe: Recipe, tok: Tokenizer, log: Callable[[str], None] = print,
                      workers: Optional[int] = None, progress: bool = True) -> str:
    """Tokenize all documents into the Megatron indexed datasets `train` and `val` (`.bin` + `.idx`,
    written by megatron-core's IndexedDatasetBuilder: one sequence and one document per source document,
    end-of-document token appended) plus `meta.json`; atomic (built in a temp dir, then renamed).
    Byte-identical for any number of tokenization workers (`data.num_workers`). Temp builds of killed
    tokenizations on this host (`tokens/*.tmp-PID@HOST` of a dead PID) are removed first."""
    from lctrain.data.megatron import indexed_dataset_module
    out = token_cache_dir(recipe, tok)
    if os.path.isfile(os.path.join(out, "meta.json")):
        return out
    workers = num_workers(recipe.data) if workers is None else workers
    stale = clean_dead_temps(os.path.dirname(out))
    if stale:
        log(f"removed {len(stale)} leftover(s) of killed tokenizations: {', '.join(stale)}")
    log(f"tokenizing the corpus with {workers} worker{'s' if workers > 1 else ''} -> {out}")
    tmp = temp_path(out)
    os.makedirs(tmp, exist_ok=True)
    idx = indexed_dataset_module()
    dtype = idx.DType.optimal_dtype(tok.vocab_size)        # what Megatron's preprocess_data.py picks
    counts = {s: [0, 0] for s in SPLITS}                    # tokens, documents
    builders = {s: idx.IndexedDatasetBuilder(idx.get_bin_path(os.path.join(tmp, s)), dtype=dtype) for s in SPLITS}
    prog = _Progress(corpus_bytes(recipe.data), log, progress and recipe.logging.progress != "off",
                     force_bar=recipe.logging.progress == "on")
    try:
        for batch, ids in encoded_documents(_documents(recipe), tok, workers):
            for (doc_id, _), arr in zip(batch, ids):
                split = "val" if is_validation(doc_id, recipe.data.val_fraction) else "train"
                builders[split].add_document(arr, [arr.size])
                counts[split][0] += arr.size
                counts[split][1] += 1
            prog.update(len(batch), sum(a.size for a in ids), sum(len(t.encode("utf-8")) for _, t in batch))
        for s in SPLITS:
            builders[s].finalize(idx.get_idx_path(os.path.join(tmp, s)))
    except BaseException:
        prog.close()
        for b in builders.values():
            b.data_file.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = prog.close()
    if counts["train"][0] < 2:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError("data: the corpus produced no training tokens (empty files or all held out)")
    total = counts["train"][0] + counts["val"][0]
    log(f"tokenized {counts['train'][1] + counts['val'][1]:,} documents, {total:,} tokens in {seconds:.1f}s "
        f"({total / max(seconds, 1e-9):,.0f} tok/s)")
    meta = {"format": "megatron-indexed", "cache_version": CACHE_VERSION, "dtype": np.dtype(dtype).name,
            "eod_id": tok.eod_id, "vocab_size": tok.vocab_size, "tokenizer": os.path.abspath(tok.path),
            **{f"{s}_tokens": c[0] for s, c in counts.items()}, **{f"{s}_docs": c[1] for s, c in counts.items()}}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    try:
        os.replace(tmp, out)
    except OSError:            # another process finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_bin(prefix: str, ds, seq_starts: np.ndarray, itemsize: int) -> None:
    """The `.bin` holds every token the `.idx` points to, back to back (the layout megatron-core writes
    and `PackedSequences` reads as one stream); ValueError naming the file otherwise (a truncated copy or
    a mismatched pair would fail only when training reaches the missing tokens, or read wrong ones)."""
    pointers = np.asarray(ds.index.sequence_pointers, dtype=np.int64)
    if not np.array_equal(pointers, seq_starts[:-1] * itemsize):
        raise ValueError(f"data: {prefix}.idx: its sequences are not stored back to back in {prefix}.bin "
                         "(not written by megatron-core's IndexedDatasetBuilder?)")
    need, size = int(seq_starts[-1]) * itemsize, os.path.getsize(prefix + ".bin")
    if size < need:
        raise ValueError(f"data: {prefix}.bin is truncated: {size:,} bytes, its .idx indexes {need:,} "
                         f"({int(seq_starts[-1]):,} tokens of {itemsize} bytes)")


class PackedSequences:
    """Fixed-length training sequences over the token stream of one Megatron indexed dataset (or a
    contiguous range of its documents), with document-start flags from the index.

    Sequence i is `stream[i*L : i*L + L + 1]` (inputs and next-token labels); `doc_start[t]` is True
    where a document of the index starts (and at stream position 0). Tokens are read memory-mapped
    through megatron-core's reader. Raises ValueError for token ids >= `vocab_size` (when given)."""

    def __init__(self, prefix: str, seq_len: int, docs: Optional[tuple[int, int]] = None,
                 vocab_size: Optional[int] = None):
        from lctrain.data.megatron import open_indexed
        self.prefix, self.seq_len, self.vocab_size = prefix, seq_len, vocab_size
        if os.path.isfile(prefix + ".bin") and os.path.getsize(prefix + ".bin") == 0:   # no tokens: nothing to map
            self.ds, self.doc_starts, self.n_docs, self.n, self.lo, self.hi = None, np.zeros(0, np.int64), 0, 0, 0, 0
            return
        self.ds = open_indexed(prefix)
        self.dtype = self.ds.index.dtype
        self.itemsize = np.dtype(self.dtype).itemsize
        seq_starts = np.concatenate([[0], np.cumsum(self.ds.sequence_lengths, dtype=np.int64)])
        _check_bin(prefix, self.ds, seq_starts, self.itemsize)
        doc_starts = seq_starts[np.asarray(self.ds.document_indices, dtype=np.int64)]
        d0, d1 = docs if docs is not None else (0, len(doc_starts) - 1)
        self.lo, self.hi = int(doc_starts[d0]), int(doc_starts[d1])
        self.doc_starts = doc_starts[d0:d1] - self.lo          # document starts, relative to lo
        self.n_docs = d1 - d0
        self.n = max(0, (self.hi - self.lo - 1) // seq_len)

    def __len__(self) -> int:
        return self.n

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [L+1] int64, doc_start [L] bool) of sequence i."""
        L, lo = self.seq_len, int(i) * self.seq_len
        window = np.asarray(self.ds.bin_reader.read(dtype=self.dtype, count=L + 1,
                                                    offset=(self.lo + lo) * self.itemsize), dtype=np.int64)
        if self.vocab_size is not None and window.size and int(window.max()) >= self.vocab_size:
            raise ValueError(f"data: {self.prefix}.bin holds token id {int(window.max())} >= the vocabulary size "
                             f"{self.vocab_size} (tokenized with another tokenizer?)")
        pos = np.arange(lo, lo + L)
        j = np.minimum(np.searchsorted(self.doc_starts, pos), max(len(self.doc_starts) - 1, 0))
        starts = (self.doc_starts[j] == pos) if len(self.doc_starts) else np.zeros(L, bool)
        return window, starts

    def batch(self, indices: Iterable[int]) -> dict[str, torch.Tensor]:
        """`input_ids`, `labels` ([B, L] int64) and `doc_start` ([B, L] bool) of sequences `indices`."""
        return _stack([self.row(i) for i in indices])


def _stack(rows: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    seq = torch.from_numpy(np.stack([r[0] for r in rows]))
    return {"input_ids": seq[:, :-1].contiguous(), "labels": seq[:, 1:].contiguous(),
            "doc_start": torch.from_numpy(np.stack([r[1] for r in rows]))}


class BlendedSequences:
    """Several PackedSequences as one indexable set. Without weights: their concatenation. With weights
    w_k (normalised): part k contributes round(w_k * N) sequences of the N = sum of their sizes, its
    sequence j % len(part) for its j-th slot (a part is repeated or cut to reach its share), as
    Megatron's BlendedDataset makes the fraction of samples from each dataset follow the weights."""

    def __init__(self, parts: list[PackedSequences], weights: Optional[list[float]] = None):
        self.parts = parts
        sizes = [len(p) for p in parts]
        if weights is None:
            counts = sizes
        else:
            total, wsum = sum(sizes), float(sum(weights))
            counts = [int(round(w / wsum * total)) for w in weights]
            for p, c in zip(parts, counts):
                if c and not len(p):
                    raise ValueError(f"data: {p.prefix} has no complete sequence of seq_len + 1 tokens to blend in")
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def row(self, i: int):
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        part = self.parts[k]
        return part.row((int(i) - int(self.offsets[k])) % len(part))

    def batch(self, indices: Iterable[int]) -> dict[str, torch.Tensor]:
        return _stack([self.row(i) for i in indices])


@dataclass
class DataOrder:
    """Seeded order over `n` sequences: a fresh permutation each epoch, indexed by global position."""
    n: int
    seed: int

    def __post_init__(self):
        if self.n <= 0:
            raise ValueError("data: no complete training sequence (corpus smaller than train.seq_len + 1 tokens)")
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm

    def indices(self, start: int, count: int) -> list[int]:
        return [int(self._permutation(p // self.n)[p % self.n]) for p in range(start, start + count)]


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    cache_dir: Optional[str]           # the token cache (None for data.source megatron: read in place)
    train: "PackedSequences | BlendedSequences"
    val: "Optional[PackedSequences | BlendedSequences]"


def prepare_data(recipe: Recipe, log: Callable[[str], None] = print) -> PreparedData:
    """Tokenizer and train/validation sequences of the recipe: its Megatron indexed datasets read in
    place (`data.source: megatron`), else the token cache (built on first use). Raises TokenizerError,
    ValueError (unreadable or too small data, naming the file) or the data source's errors."""
    if recipe.data.source == "megatron":
        return open_megatron(recipe, Tokenizer(os.path.expanduser(recipe.tokenizer.path)))
    tok = ensure_tokenizer(recipe, log)
    cache = build_token_cache(recipe, tok, log)
    return open_data(recipe, tok, cache)


def open_data(recipe: Recipe, tok: Tokenizer, cache: str) -> PreparedData:
    """Train/validation sequences of `recipe.train.seq_len` over the token cache `cache`."""
    train = PackedSequences(os.path.join(cache, "train"), recipe.train.seq_len)
    val = PackedSequences(os.path.join(cache, "val"), recipe.train.seq_len)
    return PreparedData(tok, cache, train, val if len(val) > 0 else None)


def open_megatron(recipe: Recipe, tok: Tokenizer) -> PreparedData:
    """Train/validation sequences over the recipe's Megatron indexed datasets (lctrain/data/megatron.py):
    the last `val_fraction` of each prefix's documents is validation, the rest training, blended by
    `data.weights`."""
    cfg, L = recipe.data, recipe.train.seq_len
    vocab = max(tok.vocab_size, recipe.model.vocab_size or 0)
    train, val = [], []
    for p in cfg.paths:
        prefix = os.path.expanduser(p)
        n_docs = len(PackedSequences(prefix, L).doc_starts)
        n_val = int(n_docs * cfg.val_fraction)
        train.append(PackedSequences(prefix, L, (0, n_docs - n_val), vocab))
        if n_val:
            val.append(PackedSequences(prefix, L, (n_docs - n_val, n_docs), vocab))
    val_set = BlendedSequences([v for v in val if len(v)]) if any(len(v) for v in val) else None
    return PreparedData(tok, None, BlendedSequences(train, cfg.weights), val_set)


def _register_extra_sources():
    from lctrain.data.passkey import passkey_documents
    EXTRA_SOURCES.setdefault("passkey", passkey_documents)   # recipe: data.passkey (no docs unless docs > 0)


_register_extra_sources()
