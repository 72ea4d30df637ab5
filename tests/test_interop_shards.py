"""`lctrain import` of a sharded checkpoint whose index or shards are damaged: one InteropError naming
the file (through the CLI: one line, exit 1), never a traceback; shard names cannot leave the directory."""
import json
import os
import shutil

import pytest

from lctrain.interop.hf import InteropError, import_checkpoint
from tests.interop_utils import hf_llama

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    hf = hf_llama(d / "single")
    hf.save_pretrained(str(d / "sharded"), max_shard_size="200KB")
    return d / "sharded"


def _copy(src, dst):
    shutil.copytree(src, dst)
    index = dst / "model.safetensors.index.json"
    return index, json.loads(index.read_text())


def test_damaged_shard_is_named(sharded, tmp_path):
    index, data = _copy(sharded, tmp_path / "src")
    shard = sorted(set(data["weight_map"].values()))[-1]
    (tmp_path / "src" / shard).write_bytes(b"\x00" * 100)
    with pytest.raises(InteropError, match=rf"import: .*{shard}: not a safetensors file"):
        import_checkpoint(str(tmp_path / "src"), "transformer", str(tmp_path / "out"))
    (tmp_path / "src" / shard).unlink()
    with pytest.raises(InteropError, match=rf"import: .*{shard}: no such file"):
        import_checkpoint(str(tmp_path / "src"), "transformer", str(tmp_path / "out"))


def test_bad_index_is_named(sharded, tmp_path):
    index, data = _copy(sharded, tmp_path / "src")
    index.write_text("{not json")
    with pytest.raises(InteropError, match="model.safetensors.index.json: not a shard index"):
        import_checkpoint(str(tmp_path / "src"), "transformer", str(tmp_path / "out"))
    outside = tmp_path / "outside.safetensors"
    first = sorted(set(data["weight_map"].values()))[0]
    shutil.copy(tmp_path / "src" / first, outside)
    data["weight_map"] = {k: "../outside.safetensors" for k in data["weight_map"]}
    index.write_text(json.dumps(data))
    with pytest.raises(InteropError, match=r"shard '\.\./outside\.safetensors' is not a file name in"):
        import_checkpoint(str(tmp_path / "src"), "transformer", str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_import_never_overwrites_a_non_empty_out(sharded, tmp_path):
    """--out pointing at a run directory (or a previous import) must not replace its recipe.yaml."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: my-run\n")
    with pytest.raises(InteropError, match="--out .*run exists and is not an empty directory"):
        import_checkpoint(str(sharded), "transformer", str(run))
    assert os.listdir(run) == ["recipe.yaml"] and (run / "recipe.yaml").read_text() == "name: my-run\n"
    (tmp_path / "empty").mkdir()
    import_checkpoint(str(sharded), "transformer", str(tmp_path / "empty"))
    assert sorted(os.listdir(tmp_path / "empty")) == ["model.safetensors", "recipe.yaml"]
