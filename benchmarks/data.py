"""Tokenization throughput of the token cache build at 1 and N workers (`data.num_workers`), on the
built-in corpus, with a peer: `datasets.Dataset.map(num_proc=N)` running the same sentencepiece
tokenizer over the same documents (tokenization only: it writes no Megatron index).

    python benchmarks/data.py                      # N = all cores, 12 MB of the built-in corpus, 3 reps
    python benchmarks/data.py --workers 1,2,4 --max-bytes 4000000 --reps 5

Each repetition builds the cache from scratch in a fresh directory (ours: documents read, tokenized,
written through megatron-core's IndexedDatasetBuilder); the configurations are interleaved within a
repetition so load changes on a shared machine hit all of them alike. Medians are reported, with
the speedup over 1 worker, and every cache is checked byte-identical to the 1-worker one. The load
average before and after is printed: on a shared machine the figures are only comparable to each other.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _files_equal(a: str, b: str) -> bool:
    for name in sorted(os.listdir(a)):
        if name == "meta.json":
            continue
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            if fa.read() != fb.read():
                return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default=f"1,{os.cpu_count() or 1}", help="comma-separated worker counts")
    ap.add_argument("--max-bytes", type=int, default=12_000_000, help="text bytes of the built-in corpus")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-peer", action="store_true", help="skip the datasets.map peer")
    a = ap.parse_args()
    workers = sorted({int(w) for w in a.workers.split(",")})
    from lctrain.config import recipe_from_dict
    from lctrain.data.corpus import iter_documents
    from lctrain.data.dataset import build_token_cache, ensure_tokenizer
    from lctrain.data.megatron import indexed_dataset_module
    indexed_dataset_module()            # import megatron-core once, outside the timing
    work = tempfile.mkdtemp(prefix="lctrain-bench-data-")
    try:
        base = {"tokenizer": {"vocab_size": a.vocab_size, "train_bytes": 4_000_000},
                "data": {"max_bytes": a.max_bytes, "cache_dir": os.path.join(work, "tok")},
                "logging": {"progress": "off"}}
        tok = ensure_tokenizer(recipe_from_dict(base), log=lambda m: None)   # trained once, outside the timing
        docs = [t for _, t in iter_documents(recipe_from_dict(base).data)]
        n_bytes = sum(len(t.encode()) for t in docs)
        print(f"corpus: built-in, {len(docs):,} documents, {n_bytes / 1e6:.1f} MB; tokenizer {tok.vocab_size} pieces; "
              f"{os.cpu_count()} cores; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        times: dict[str, list[float]] = {}
        tokens = {}
        identical = True
        for rep in range(a.reps):
            first_dir = None
            for w in workers:
                cache = os.path.join(work, f"c{rep}-{w}")
                r = recipe_from_dict({**base, "tokenizer": {"path": tok.path},
                                      "data": {**base["data"], "cache_dir": cache, "num_workers": w}})
                t0 = time.perf_counter()
                out = build_token_cache(r, tok, log=lambda m: None, progress=False)
                times.setdefault(f"lctrain cache, {w} worker(s)", []).append(time.perf_counter() - t0)
                size = sum(os.path.getsize(os.path.join(out, s + ".bin")) for s in ("train", "val"))
                tokens["lctrain"] = size // (2 if tok.vocab_size < 65500 else 4)
                if first_dir is None:
                    first_dir = out
                else:
                    identical &= _files_equal(first_dir, out)
            if not a.no_peer:
                import datasets
                datasets.disable_progress_bars()
                ds = datasets.Dataset.from_dict({"text": docs})
                for w in workers:
                    t0 = time.perf_counter()
                    m = ds.map(lambda b: {"ids": tok.encode_batch(b["text"], threads=1)}, batched=True, batch_size=64,
                               num_proc=w if w > 1 else None, remove_columns=["text"], load_from_cache_file=False,
                               keep_in_memory=True)
                    times.setdefault(f"datasets.map, num_proc={w}", []).append(time.perf_counter() - t0)
                    tokens["peer"] = sum(len(x) + 1 for x in m["ids"])
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; caches byte-identical across "
              f"worker counts: {identical}")
        print()
        print("| configuration | median s | tokens/s | speedup vs 1 worker |")
        print("|---|---|---|---|")
        for name, ts in times.items():
            med = statistics.median(ts)
            kind = "lctrain" if name.startswith("lctrain") else "peer"
            one = statistics.median(times[[k for k in times if k.startswith(name.split(",")[0]) and
                                           (k.endswith(" 1 worker(s)") or k.endswith("num_proc=1"))][0]])
            print(f"| {name} | {med:.2f} | {tokens[kind] / med:,.0f} | {one / med:.2f}x |")
        return 0 if identical else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
