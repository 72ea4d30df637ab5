"""Document sources: the built-in corpus (the interpreter's standard-library sources) and local
jsonl / parquet / text files through `datasets`. A document is `(doc_id, text)`; the validation split
is a stable hash of the doc id, so it never changes with the order, the machine or the seed.

Bad data is refused with one line naming the file and what is wrong with it (`DataError`): an empty
file, a file whose documents are all empty, a text field that is not a string, bytes that are not
UTF-8. (`data.source: megatron` holds token ids, not text: see lctrain/data/megatron.py.)
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import os
import sys
import sysconfig
from typing import Iterator, Optional

from lctrain.config import DataConfig
from lctrain.schema import ConfigError


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and the problem."""

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo"}


def builtin_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def builtin_documents() -> Iterator[tuple[str, str]]:
    """Every `.py` file of the running interpreter's standard library, in a stable order."""
    root = builtin_root()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                yield os.path.relpath(path, root), text


def _expand(paths: list[str]) -> list[str]:
    files: list[str] = []
    for p in paths:
        files.extend(sorted(glob.glob(os.path.expanduser(p))))
    return files


def file_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """Documents from local files through `datasets` (streamed when `data.streaming`), file by file in
    the sorted order of `data.paths` (doc ids count rows across all files). Raises DataError."""
    counter = itertools.count()
    for path in _expand(cfg.paths):
        if os.path.getsize(path) == 0:
            raise DataError(f"data: {path}: the file is empty")
        if cfg.source == "text":      # one document per file: a text file is a document, not a list of lines
            with open(path, "rb") as f:
                text = _utf8(f.read(), path)
            if not text.strip():
                raise DataError(f"data: {path}: the file holds only whitespace")
            yield path, text
        else:
            yield from _table_documents(cfg, path, counter)


def _utf8(raw: bytes, path: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data: {path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def _table_documents(cfg: DataConfig, path: str, counter) -> Iterator[tuple[str, str]]:
    # local files only: unless offline, datasets still asks the Hub / S3 about its packaged builders (DNS + HTTPS)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    datasets.disable_progress_bars()
    builder = {"jsonl": "json", "parquet": "parquet"}[cfg.source]

    def unreadable(e: Exception) -> DataError:
        if isinstance(e, UnicodeDecodeError) or "utf-8" in str(e).lower():
            return DataError(f"data: {path}: not UTF-8 text ({str(e).splitlines()[0]})")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return DataError(f"data: {path}: cannot read it as {cfg.source} ({first})")

    try:
        ds = datasets.load_dataset(builder, data_files=[path], split="train", streaming=cfg.streaming)
        rows = iter(ds)
    except Exception as e:  # datasets raises many types for unreadable files
        raise unreadable(e) from None
    n_rows = n_docs = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except Exception as e:  # streaming reads (and fails) lazily
            raise unreadable(e) from None
        i = next(counter)
        n_rows += 1
        if cfg.text_field not in row:
            raise ConfigError("data.text_field", f"{cfg.text_field!r} is not a column of {path}; columns: {', '.join(row)}")
        text = row[cfg.text_field]
        if not isinstance(text, str):
            raise DataError(f"data: {path}: row {n_rows}: field {cfg.text_field!r} holds "
                            f"{type(text).__name__} ({str(text)[:40]!r}), not a string")
        if text:
            n_docs += 1
            yield f"{i}", text
    if n_docs == 0:
        raise DataError(f"data: {path}: no documents: all {n_rows} rows have an empty {cfg.text_field!r} field")


def iter_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """Documents of the configured source, stopping once `data.max_bytes` of text has been read."""
    if cfg.source == "megatron":
        raise DataError("data: source 'megatron' holds token ids, not text (pass text files, e.g. eval length --text)")
    source = builtin_documents() if cfg.source == "builtin" else file_documents(cfg)
    total = 0
    for doc_id, text in source:
        if cfg.max_bytes is not None and total >= cfg.max_bytes:
            return
        total += len(text.encode("utf-8"))
        yield doc_id, text


def corpus_bytes(cfg: DataConfig) -> Optional[int]:
    """Approximate text bytes the source holds (file sizes, capped by data.max_bytes): for progress ETAs."""
    if cfg.source == "builtin":
        total = 0
        for dirpath, dirnames, filenames in os.walk(builtin_root()):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
            total += sum(os.path.getsize(os.path.join(dirpath, n)) for n in filenames if n.endswith(".py"))
    elif cfg.source in ("jsonl", "parquet", "text"):
        total = sum(os.path.getsize(f) for f in _expand(cfg.paths))
    else:
        return None
    return min(total, cfg.max_bytes) if cfg.max_bytes is not None else total


def is_validation(doc_id: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "little")
    return h / 2 ** 64 < fraction


# Joins held-out documents into one stream (probes, the text passkey haystack): a blank line, no
# end-of-document token, so the model's state is not reset between them.
DOC_SEPARATOR = "\n\n"


def split_token_docs(cfg: DataConfig, tokenizer, validation: bool, need: Optional[int]) -> list:
    """Tokenized documents of one split (validation: the held-out `val_fraction` by doc-id hash, else the
    training split) of the whole source (`data.max_bytes` does not limit it), in corpus order, until
    `need` tokens are collected (None: all). Returns a list of 1-D int32 numpy arrays (empty documents
    left out; the list is empty when the split has none)."""
    import dataclasses

    import numpy as np
    full = dataclasses.replace(cfg, max_bytes=None)
    docs, n, batch = [], 0, []

    def flush() -> bool:                 # tokenizes the batch in one call; True once `need` is reached
        nonlocal n
        for ids in tokenizer.encode_batch(batch):
            if ids:
                docs.append(np.asarray(ids, dtype=np.int32))
                n += len(ids)
            if need is not None and n >= need:
                return True
        batch.clear()
        return False

    for doc_id, text in iter_documents(full):
        if is_validation(doc_id, cfg.val_fraction) == validation:
            batch.append(text)
            if len(batch) >= 64 and flush():
                return docs
    if batch:
        flush()
    return docs


def corpus_fingerprint(cfg: DataConfig) -> str:
    """Identifies the documents a config reads (for caching tokenizers and token files)."""
    parts = [cfg.source, cfg.text_field, str(cfg.max_bytes), str(cfg.val_fraction)]
    if cfg.source == "builtin":
        parts.append(f"{sys.version_info[:3]}:{builtin_root()}")
    else:
        for f in _expand(cfg.paths):
            st = os.stat(f)
            parts.append(f"{os.path.abspath(f)}:{st.st_size}:{int(st.st_mtime)}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]
