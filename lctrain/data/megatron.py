"""Megatron-LM indexed datasets (`.bin` + `.idx` pairs), read and written through megatron-core.

Format and library: `megatron.core.datasets.indexed_dataset` (`IndexedDataset` reads, memory-mapped;
`IndexedDatasetBuilder` writes). The `.bin` is the token stream (all sequences back to back, dtype
from the index); the `.idx` holds per-sequence lengths and byte pointers and the document indices
(sequence index where each document starts). Megatron-LM, GPT-NeoX and Linear-MoE write it with
`tools/preprocess_data.py`; lctrain's own token cache is the same format (one sequence per document,
the end-of-document token appended, as `preprocess_data.py --append-eod` writes).

`data.source: megatron` trains on such datasets: `data.paths` are path prefixes (`/data/pile_text_document`
for `/data/pile_text_document.{bin,idx}`), `data.weights` optional blend weights (the fraction of
training sequences drawn from each prefix). Document starts come from the index, so `doc_start`
resets are exact whether or not the corpus has end-of-document tokens. The last `data.val_fraction`
of each prefix's documents is held out for validation (a contiguous document range, as Megatron's
`--split` does).
"""
from __future__ import annotations

import os
import warnings

from lctrain.schema import fail, require


def indexed_dataset_module():
    """`megatron.core.datasets.indexed_dataset` (imported on first use; its package warns about optional
    GPU libraries we do not use)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def validate_megatron_paths(cfg, path: str) -> None:
    """`data.paths` are prefixes of existing `.bin`/`.idx` pairs; `data.weights` one positive number each."""
    require(bool(cfg.paths), f"{path}.paths", "needs at least one .bin/.idx path prefix for source 'megatron'")
    require(cfg.passkey.docs == 0, f"{path}.passkey.docs", "synthetic documents cannot be mixed into a pre-tokenized "
                                                          "source 'megatron' (tokenize them into an indexed dataset)")
    for i, p in enumerate(cfg.paths):
        prefix = os.path.expanduser(p)
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                fail(f"{path}.paths[{i}]", f"no file {prefix + ext} (give the path prefix of a .bin/.idx pair, "
                                           "e.g. /data/corpus_text_document)")
    if cfg.weights is not None:
        require(len(cfg.weights) == len(cfg.paths), f"{path}.weights",
                f"needs one weight per path ({len(cfg.paths)}), got {len(cfg.weights)}")
        require(all(w >= 0 for w in cfg.weights) and sum(cfg.weights) > 0, f"{path}.weights",
                f"must be >= 0 with a positive sum, got {cfg.weights}")


def open_indexed(prefix: str):
    """megatron-core's memory-mapped IndexedDataset at `prefix`; one-line error if it is unreadable."""
    mod = indexed_dataset_module()
    try:
        return mod.IndexedDataset(prefix, mmap=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"data: {prefix}.idx/.bin is not a readable Megatron indexed dataset ({first})") from None
