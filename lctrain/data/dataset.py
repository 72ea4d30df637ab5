"""Tokenized, packed training data with document boundaries and a resumable, seeded order.

1. `prepare_data` resolves the tokenizer (the recipe's file, or one trained on the data and cached),
   then tokenizes every document once into a token cache: `train.bin` / `val.bin` (one flat stream,
   each document followed by the end-of-document token), written atomically.
2. `PackedSequences` cuts a stream into fixed-length sequences `stream[i*L : i*L + L + 1]` (inputs and
   next-token labels) and marks `doc_start[t]` where the previous stream token is the end-of-document
   token, so mixers reset their state exactly at document starts (also across sequence shards).
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
from lctrain.data.corpus import corpus_fingerprint, is_validation, iter_documents
from lctrain.data.tokenizer import Tokenizer, train_tokenizer
from lctrain.schema import to_dict

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
    # the passkey source adds nothing (and so changes no key) unless data.passkey.docs > 0
    mixing = recipe.data.passkey.docs > 0
    extras = ",".join(sorted(n for n in EXTRA_SOURCES if n != "passkey" or mixing))
    mix = to_dict(recipe.data.passkey) if mixing else {}   # the options the extra sources read
    key = hashlib.sha1(f"{corpus_fingerprint(recipe.data)}|{_file_sha(tok.path)}|{extras}|"
                       f"{json.dumps(mix, sort_keys=True, default=str)}".encode()).hexdigest()[:16]
    return os.path.join(cache_root(recipe.data), "tokens", key)


def build_token_cache(recipe: Recipe, tok: Tokenizer, log: Callable[[str], None] = print) -> str:
    """Tokenize all documents into train.bin / val.bin (atomic: built in a temp dir, then renamed)."""
    out = token_cache_dir(recipe, tok)
    if os.path.isfile(os.path.join(out, "meta.json")):
        return out
    log(f"tokenizing the corpus -> {out}")
    tmp = f"{out}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    counts = {"train": [0, 0], "val": [0, 0]}     # tokens, documents
    files = {s: open(os.path.join(tmp, f"{s}.bin"), "wb") for s in counts}
    eod = tok.eod_id
    try:
        batch: list[tuple[str, str]] = []

        def flush():
            ids = tok.encode_batch([t for _, t in batch])
            for (doc_id, _), toks in zip(batch, ids):
                split = "val" if is_validation(doc_id, recipe.data.val_fraction) else "train"
                arr = np.asarray(toks + [eod], dtype=dtype)
                files[split].write(arr.tobytes())
                counts[split][0] += arr.size
                counts[split][1] += 1
            batch.clear()

        for doc in _documents(recipe):
            batch.append(doc)
            if len(batch) >= 64:
                flush()
        flush()
    finally:
        for f in files.values():
            f.close()
    if counts["train"][0] < 2:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError("data: the corpus produced no training tokens (empty files or all held out)")
    meta = {"dtype": np.dtype(dtype).name, "eod_id": eod, "vocab_size": tok.vocab_size,
            "tokenizer": os.path.abspath(tok.path),
            **{f"{s}_tokens": c[0] for s, c in counts.items()}, **{f"{s}_docs": c[1] for s, c in counts.items()}}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    try:
        os.replace(tmp, out)
    except OSError:            # another process finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class PackedSequences:
    """Fixed-length training sequences over one token stream, with document-start flags."""

    def __init__(self, cache_dir: str, split: str, seq_len: int):
        with open(os.path.join(cache_dir, "meta.json")) as f:
            meta = json.load(f)
        self.eod_id, self.seq_len = meta["eod_id"], seq_len
        path = os.path.join(cache_dir, f"{split}.bin")
        size = os.path.getsize(path) // np.dtype(meta["dtype"]).itemsize
        self.tokens = np.memmap(path, dtype=meta["dtype"], mode="r", shape=(size,)) if size else np.zeros(0, np.uint16)
        self.n = max(0, (size - 1) // seq_len)

    def __len__(self) -> int:
        return self.n

    def batch(self, indices: Iterable[int]) -> dict[str, torch.Tensor]:
        L = self.seq_len
        rows, starts = [], []
        for i in indices:
            lo = int(i) * L
            window = np.asarray(self.tokens[lo:lo + L + 1], dtype=np.int64)
            prev = int(self.tokens[lo - 1]) if lo > 0 else self.eod_id
            rows.append(window)
            starts.append(np.concatenate([[prev], window[:L - 1]]) == self.eod_id)
        seq = torch.from_numpy(np.stack(rows))
        return {"input_ids": seq[:, :-1].contiguous(), "labels": seq[:, 1:].contiguous(),
                "doc_start": torch.from_numpy(np.stack(starts))}


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
    cache_dir: str
    train: PackedSequences
    val: Optional[PackedSequences]


def prepare_data(recipe: Recipe, log: Callable[[str], None] = print) -> PreparedData:
    tok = ensure_tokenizer(recipe, log)
    cache = build_token_cache(recipe, tok, log)
    return open_data(recipe, tok, cache)


def open_data(recipe: Recipe, tok: Tokenizer, cache: str) -> PreparedData:
    train = PackedSequences(cache, "train", recipe.train.seq_len)
    val = PackedSequences(cache, "val", recipe.train.seq_len)
    return PreparedData(tok, cache, train, val if len(val) > 0 else None)


def _register_extra_sources():
    from lctrain.data.passkey import passkey_documents
    EXTRA_SOURCES.setdefault("passkey", passkey_documents)   # recipe: data.passkey (no docs unless docs > 0)


_register_extra_sources()
