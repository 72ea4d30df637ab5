"""A `.bin` that does not hold what its `.idx` indexes (a truncated copy) is refused at start-up,
naming the file, before the run directory is touched, not when training reaches the missing tokens."""
import os

import pytest

from lctrain.config import recipe_from_dict
from lctrain.data.dataset import prepare_data
from lctrain.data.tokenizer import train_tokenizer
from tests.foundation_utils import tiny_recipe_dict
from tests.test_data_megatron import _random_docs, _write_megatron


def test_truncated_megatron_bin_is_refused_at_start(tmp_path):
    from lctrain.data.corpus import builtin_documents
    from lctrain.train.trainer import train
    tok = train_tokenizer(iter([t for _, t in builtin_documents()][:30]), str(tmp_path / "t.model"), 512, 200_000)
    prefix = str(tmp_path / "corpus")
    _write_megatron(prefix, _random_docs(200, tok.vocab_size, 0), tok.vocab_size)
    size = os.path.getsize(prefix + ".bin")
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(size // 2)                   # an interrupted copy: the first sequences are still readable
    data = {"source": "megatron", "paths": [prefix], "val_fraction": 0.0}
    with pytest.raises(ValueError, match=r"corpus.bin is truncated: [\d,]+ bytes, its .idx indexes [\d,]+"):
        prepare_data(recipe_from_dict({"tokenizer": {"path": tok.path}, "train": {"seq_len": 8}, "data": data}))
    raw = tiny_recipe_dict(str(tmp_path / "cache"), steps=2, val_every=0)
    raw["model"] = {"arch": "mamba2", "d_model": 32, "n_layers": 1, "mixers": {"mamba2": {"d_state": 8, "headdim": 16}}}
    raw["tokenizer"], raw["data"] = {"path": tok.path}, data
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="truncated"):
        train(recipe_from_dict(raw), run_dir=str(run), log=lambda m: None)
    assert not run.exists()
