"""Document sources: the built-in corpus (the interpreter's standard-library sources) and local
jsonl / parquet / text files through `datasets`. A document is `(doc_id, text)`; the validation split
is a stable hash of the doc id, so it never changes with the order, the machine or the seed.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sys
import sysconfig
from typing import Iterator

from lctrain.config import DataConfig
from lctrain.schema import ConfigError

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
    """Documents from local files through `datasets` (streamed when `data.streaming`)."""
    files = _expand(cfg.paths)
    if cfg.source == "text":
        # one document per file: a text file is a document, not a list of lines
        for path in files:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield path, f.read()
        return
    # local files only: unless offline, datasets still asks the Hub / S3 about its packaged builders (DNS + HTTPS)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    datasets.disable_progress_bars()
    builder = {"jsonl": "json", "parquet": "parquet"}[cfg.source]
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=cfg.streaming)
    except Exception as e:  # datasets raises many types for unreadable files
        raise ConfigError("data.paths", f"cannot read {cfg.source} files: {str(e).splitlines()[0]}") from None
    for i, row in enumerate(ds):
        if cfg.text_field not in row:
            raise ConfigError("data.text_field", f"{cfg.text_field!r} is not a column; columns: {', '.join(row)}")
        text = row[cfg.text_field]
        if isinstance(text, str) and text:
            yield f"{i}", text


def iter_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """Documents of the configured source, stopping once `data.max_bytes` of text has been read."""
    source = builtin_documents() if cfg.source == "builtin" else file_documents(cfg)
    total = 0
    for doc_id, text in source:
        if cfg.max_bytes is not None and total >= cfg.max_bytes:
            return
        total += len(text.encode("utf-8"))
        yield doc_id, text


def is_validation(doc_id: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "little")
    return h / 2 ** 64 < fraction


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
