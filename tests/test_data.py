"""Tokenizer round trip, packing (boundaries kept, no token lost), data order, file sources."""
import json

import numpy as np
import pytest

from lctrain.config import recipe_from_dict
from lctrain.data.corpus import builtin_documents, is_validation
from lctrain.data.dataset import DataOrder, prepare_data
from lctrain.data.tokenizer import Tokenizer, TokenizerError, train_tokenizer


@pytest.fixture(scope="module")
def code_tokenizer(tmp_path_factory):
    docs = [t for _, t in builtin_documents()][:40]
    return train_tokenizer(iter(docs), str(tmp_path_factory.mktemp("tok") / "t.model"), 512, 300_000)


def test_round_trip_keeps_indentation(code_tokenizer):
    docs = [t for _, t in builtin_documents()][200:205]
    for text in docs:
        assert code_tokenizer.decode(code_tokenizer.encode(text)) == text
    src = "class A:\n\tdef f(self):\n        return  {'k': 12345}  # trailing  \n\n\n"
    assert code_tokenizer.decode(code_tokenizer.encode(src)) == src
    digits = [code_tokenizer.sp.id_to_piece(i) for i in code_tokenizer.encode("98765")]
    assert digits == list("98765")          # split digits: numbers are read digit by digit


def test_bad_tokenizer_file(tmp_path):
    p = tmp_path / "x.model"
    p.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        Tokenizer(str(p))


def _jsonl_recipe(tmp_path, docs, seq_len=16, **data):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return recipe_from_dict({
        "tokenizer": {"vocab_size": 300, "train_bytes": 100_000},
        "data": {"source": "jsonl", "paths": [str(path)], "text_field": "body", "val_fraction": 0.0,
                 "cache_dir": str(tmp_path / "cache"), **data},
        "train": {"seq_len": seq_len, "steps": 1}, "optim": {"warmup_steps": 0}})


def _docs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    words = ["def", "return", "x", "y", "self", "(", ")", ":", "    ", "\n", "import", "os", "1", "2"]
    return ["".join(rng.choice(words, size=rng.integers(1, 40))) for _ in range(n)]


def test_packing_keeps_boundaries_and_loses_no_token(tmp_path):
    docs = _docs()
    recipe = _jsonl_recipe(tmp_path, docs)
    data = prepare_data(recipe, log=lambda m: None)
    tok, eod = data.tokenizer, data.tokenizer.eod_id
    stream = np.concatenate([np.asarray(tok.encode(d) + [eod]) for d in docs])
    packed = data.train
    L = recipe.train.seq_len
    assert len(packed) == (len(stream) - 1) // L
    b = packed.batch(range(len(packed)))
    ids, labels, starts = b["input_ids"].numpy(), b["labels"].numpy(), b["doc_start"].numpy()
    # inputs followed by the last label reproduce the stream: no token lost or reordered
    covered = np.concatenate([ids.reshape(-1), labels[-1, -1:]])
    assert np.array_equal(covered, stream[:len(covered)])
    assert np.array_equal(labels.reshape(-1), stream[1:len(covered)])
    # a document starts exactly where the previous stream token is the end-of-document token
    flat_prev = np.concatenate([[eod], stream[:len(covered) - 2]])
    assert np.array_equal(starts.reshape(-1), flat_prev == eod)
    assert starts.sum() == min(len(docs), int((stream[:len(covered) - 2] == eod).sum()) + 1)


def test_text_and_parquet_sources(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq
    docs = _docs(30, seed=1)
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    r = recipe_from_dict({"tokenizer": {"vocab_size": 300, "train_bytes": 100_000},
                          "data": {"source": "parquet", "paths": [str(tmp_path / "*.parquet")], "val_fraction": 0.0,
                                   "cache_dir": str(tmp_path / "c1")},
                          "train": {"seq_len": 8, "steps": 1}, "optim": {"warmup_steps": 0}})
    d = prepare_data(r, log=lambda m: None)
    meta = json.load(open(f"{d.cache_dir}/meta.json"))
    assert meta["train_docs"] == len(docs)
    for i, text in enumerate(docs[:3]):
        (tmp_path / f"f{i}.txt").write_text(text)
    r = recipe_from_dict({"tokenizer": {"path": d.tokenizer.path},
                          "data": {"source": "text", "paths": [str(tmp_path / "f*.txt")], "val_fraction": 0.0,
                                   "cache_dir": str(tmp_path / "c2")},
                          "train": {"seq_len": 4, "steps": 1}, "optim": {"warmup_steps": 0}})
    d2 = prepare_data(r, log=lambda m: None)
    assert json.load(open(f"{d2.cache_dir}/meta.json"))["train_docs"] == 3


def test_missing_text_field_is_a_config_error(tmp_path):
    from lctrain.schema import ConfigError
    r = _jsonl_recipe(tmp_path, _docs(5))
    r.data.text_field = "nope"
    with pytest.raises(ConfigError, match="data.text_field: 'nope' is not a column"):
        prepare_data(r, log=lambda m: None)


def test_data_order_is_seeded_and_covers_every_sequence():
    o1, o2, o3 = DataOrder(50, 1), DataOrder(50, 1), DataOrder(50, 2)
    a = o1.indices(0, 100)
    assert a == o2.indices(0, 100) and a != o3.indices(0, 100)
    assert sorted(a[:50]) == list(range(50)) and sorted(a[50:]) == list(range(50)) and a[:50] != a[50:]
    assert o1.indices(37, 20) == a[37:57]          # random access = resumable


def test_validation_split_is_stable():
    ids = [f"doc{i}" for i in range(2000)]
    held = [d for d in ids if is_validation(d, 0.1)]
    assert 150 < len(held) < 250
    assert held == [d for d in ids if is_validation(d, 0.1)]
