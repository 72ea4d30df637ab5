"""Megatron indexed datasets through megatron-core: lctrain's token cache is one (read back by
megatron-core), `data.source: megatron` trains on one written by megatron-core's builder (document
starts from the index, blend weights, held-out documents), parallel tokenization is byte-identical."""
import json
import os

import numpy as np
import pytest
import torch

from lctrain.config import recipe_from_dict
from lctrain.data import dataset as ds_mod
from lctrain.data.dataset import build_token_cache, prepare_data, token_cache_dir
from lctrain.data.megatron import indexed_dataset_module
from lctrain.data.tokenizer import train_tokenizer
from lctrain.schema import ConfigError
from tests.foundation_utils import tiny_recipe_dict


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from lctrain.data.corpus import builtin_documents
    docs = [t for _, t in builtin_documents()][:30]
    return train_tokenizer(iter(docs), str(tmp_path_factory.mktemp("tok") / "t.model"), 512, 200_000)


def _builtin_recipe(tmp_path, tok, **data):
    return recipe_from_dict({"tokenizer": {"path": tok.path},
                             "data": {"max_bytes": 150_000, "val_fraction": 0.2,
                                      "cache_dir": str(tmp_path / "cache"), **data},
                             "train": {"seq_len": 32}, "logging": {"progress": "off"}})


def test_cache_is_a_megatron_dataset_read_back_by_megatron_core(tmp_path, tok):
    from lctrain.data.corpus import is_validation, iter_documents
    recipe = _builtin_recipe(tmp_path, tok)
    data = prepare_data(recipe, log=lambda m: None)
    idx = indexed_dataset_module()
    docs = list(iter_documents(recipe.data))
    for split in ("train", "val"):
        want = [np.asarray(tok.encode(t) + [tok.eod_id]) for d, t in docs
                if is_validation(d, 0.2) == (split == "val")]
        mds = idx.IndexedDataset(os.path.join(data.cache_dir, split))     # megatron-core's own reader
        assert len(mds) == len(want) and len(mds.document_indices) == len(want) + 1
        for i in range(len(want)):
            assert np.array_equal(mds[i], want[i])
    meta = json.load(open(os.path.join(data.cache_dir, "meta.json")))
    assert meta["format"] == "megatron-indexed" and meta["cache_version"] == ds_mod.CACHE_VERSION


def test_parallel_tokenization_is_byte_identical(tmp_path, tok):
    dirs = []
    for workers in (1, 3):
        recipe = _builtin_recipe(tmp_path / f"w{workers}", tok)
        dirs.append(build_token_cache(recipe, tok, log=lambda m: None, workers=workers))
    names = sorted(os.listdir(dirs[0]))
    assert names == ["meta.json", "train.bin", "train.idx", "val.bin", "val.idx"]
    for n in names:
        a, b = (open(os.path.join(d, n), "rb").read() for d in dirs)
        assert a == b, n


def test_cache_key_carries_the_format_version(tmp_path, tok, monkeypatch):
    recipe = _builtin_recipe(tmp_path, tok)
    key = token_cache_dir(recipe, tok)
    monkeypatch.setattr(ds_mod, "CACHE_VERSION", "flat-stream-0")
    assert token_cache_dir(recipe, tok) != key       # an old-format cache lives under another key


def _write_megatron(prefix, docs, vocab):
    idx = indexed_dataset_module()
    b = idx.IndexedDatasetBuilder(idx.get_bin_path(prefix), dtype=idx.DType.optimal_dtype(vocab))
    for d in docs:
        b.add_document(np.asarray(d), [len(d)])
    b.finalize(idx.get_idx_path(prefix))


def _random_docs(n, vocab, seed, lo=2, hi=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]   # no EOD tokens


def test_megatron_source_document_starts_from_the_index(tmp_path, tok):
    docs = _random_docs(50, tok.vocab_size, 0)
    _write_megatron(str(tmp_path / "corpus"), docs, tok.vocab_size)
    recipe = recipe_from_dict({"tokenizer": {"path": tok.path}, "train": {"seq_len": 16},
                               "data": {"source": "megatron", "paths": [str(tmp_path / "corpus")], "val_fraction": 0.1}})
    data = prepare_data(recipe, log=lambda m: None)
    stream = np.concatenate([np.asarray(d) for d in docs[:45]])      # the last 5 documents are validation
    starts = np.zeros(len(stream), bool)
    starts[np.cumsum([0] + [len(d) for d in docs[:44]])] = True
    assert len(data.train) == (len(stream) - 1) // 16
    b = data.train.batch(range(len(data.train)))
    n = b["input_ids"].numel()
    assert np.array_equal(b["input_ids"].numpy().reshape(-1), stream[:n])
    assert np.array_equal(b["labels"].numpy().reshape(-1), stream[1:n + 1])
    assert np.array_equal(b["doc_start"].numpy().reshape(-1), starts[:n])
    val = np.concatenate([np.asarray(d) for d in docs[45:]])
    assert len(data.val) == (len(val) - 1) // 16
    assert np.array_equal(data.val.batch([0])["input_ids"].numpy()[0], val[:16])


def test_megatron_blend_weights(tmp_path, tok):
    for name, seed in (("a", 1), ("b", 2)):
        _write_megatron(str(tmp_path / name), _random_docs(40, tok.vocab_size, seed), tok.vocab_size)
    data = {"source": "megatron", "paths": [str(tmp_path / "a"), str(tmp_path / "b")], "val_fraction": 0.0}
    plain = prepare_data(recipe_from_dict({"tokenizer": {"path": tok.path}, "train": {"seq_len": 8}, "data": data}))
    na, nb = (len(p) for p in plain.train.parts)
    blended = prepare_data(recipe_from_dict({"tokenizer": {"path": tok.path}, "train": {"seq_len": 8},
                                             "data": {**data, "weights": [3, 1]}}))
    n = len(blended.train)
    assert abs(n - (na + nb)) <= 1
    first_b = int(blended.train.offsets[1])
    assert first_b == round(0.75 * (na + nb))
    # slots beyond part a's size repeat its sequences in order; part b's slots start at its sequence 0
    assert torch.equal(blended.train.batch([na])["input_ids"], plain.train.batch([0])["input_ids"])
    assert torch.equal(blended.train.batch([first_b])["input_ids"], plain.train.batch([na])["input_ids"])


def test_megatron_source_trains(tmp_path, tok):
    from lctrain.train.trainer import train
    _write_megatron(str(tmp_path / "corpus"), _random_docs(300, tok.vocab_size, 3), tok.vocab_size)
    raw = tiny_recipe_dict(str(tmp_path / "cache"), steps=3, val_every=0)
    raw["model"] = {"arch": "mamba2", "d_model": 32, "n_layers": 1, "mixers": {"mamba2": {"d_state": 8, "headdim": 16}}}
    raw["tokenizer"] = {"path": tok.path}
    raw["data"] = {"source": "megatron", "paths": [str(tmp_path / "corpus")], "val_fraction": 0.05}
    out = train(recipe_from_dict(raw), run_dir=str(tmp_path / "run"), log=lambda m: None)
    assert out["status"] == "completed" and out["step"] == 3 and np.isfinite(out["loss"]) and np.isfinite(out["val_loss"])


def test_megatron_config_errors(tmp_path, tok):
    with pytest.raises(ConfigError, match=r"data.paths\[0\]: no file .*nope.bin"):
        recipe_from_dict({"tokenizer": {"path": tok.path}, "data": {"source": "megatron", "paths": [str(tmp_path / "nope")]}})
    _write_megatron(str(tmp_path / "c"), _random_docs(5, 1000, 0), 1000)
    with pytest.raises(ConfigError, match="tokenizer.path: source 'megatron' holds token ids"):
        recipe_from_dict({"data": {"source": "megatron", "paths": [str(tmp_path / "c")]}})
    with pytest.raises(ConfigError, match="data.weights: needs one weight per path"):
        recipe_from_dict({"tokenizer": {"path": tok.path},
                          "data": {"source": "megatron", "paths": [str(tmp_path / "c")], "weights": [1, 2]}})
    data = prepare_data(recipe_from_dict({"tokenizer": {"path": tok.path}, "train": {"seq_len": 8},
                                          "data": {"source": "megatron", "paths": [str(tmp_path / "c")], "val_fraction": 0}}))
    with pytest.raises(ValueError, match=r"c.bin holds token id \d+ >= the vocabulary size 512"):
        data.train.batch(range(len(data.train)))


def test_tokenization_progress_without_a_terminal():
    """No TTY: a plain line every 30 s with documents, tokens, tokens/s and the ETA from text bytes."""
    lines = []
    prog = ds_mod._Progress(total_bytes=1000, log=lines.append, enabled=True)
    clock = iter([100.0, 131.0, 140.0])
    prog.t0 = prog.last = 100.0
    prog.time = lambda: next(clock)
    prog.update(docs=10, tokens=3000, nbytes=250)        # t = 100: nothing yet
    prog.update(docs=10, tokens=3100, nbytes=250)        # t = 131: 31 s since the last line
    assert lines == ["tokenizing: 20 docs, 6,100 tokens, 197 tok/s, ETA 31s"]
