"""Bad data files are refused with one line naming the file and what is wrong with the data (not an
IndexError, and not the tokenizer's "cannot train a 512-piece BPE" message that followed from it)."""
import json

import pytest

from lctrain.config import recipe_from_dict
from lctrain.data.dataset import prepare_data
from tests.foundation_utils import run_cli

CASES = {
    "empty": (b"", "the file is empty"),
    "all_empty_docs": (b'{"text": ""}\n{"text": ""}\n', r"no documents: all 2 rows have an empty 'text' field"),
    "non_string": (b'{"text": "fine"}\n{"text": 5}\n', r"row 2: field 'text' holds int \('5'\), not a string"),
    "null_text": (b'{"text": null}\n', r"row 1: field 'text' holds NoneType"),
    "non_utf8": (b'{"text": "ab\xff\xfe cd"}\n', "not UTF-8 text"),
}


def _recipe(tmp_path, path, source="jsonl"):
    return recipe_from_dict({"tokenizer": {"vocab_size": 512}, "logging": {"progress": "off"},
                             "data": {"source": source, "paths": [str(path)], "cache_dir": str(tmp_path / "cache")}})


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_jsonl_names_the_file_and_the_problem(tmp_path, case):
    content, msg = CASES[case]
    path = tmp_path / f"{case}.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^data: {path}: {msg}") as e:
        prepare_data(_recipe(tmp_path, path), log=lambda m: None)
    assert "\n" not in str(e.value)


def test_bad_file_among_good_ones_is_named(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text("".join(json.dumps({"text": f"def f{i}(): return {i}\n" * 20}) + "\n" for i in range(50)))
    (tmp_path / "b.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"^data: {tmp_path / 'b.jsonl'}: the file is empty"):
        prepare_data(_recipe(tmp_path, tmp_path / "*.jsonl"), log=lambda m: None)


def test_text_source_non_utf8(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_bytes(b"hello \xc3\x28 world")
    with pytest.raises(ValueError, match=rf"^data: {path}: not UTF-8 text \(byte 0xc3 at offset 6\)"):
        prepare_data(_recipe(tmp_path, path, "text"), log=lambda m: None)


def test_cli_one_line_and_exit_code(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{arch: mamba2}}\ndata: {{source: jsonl, paths: ['{path}'], cache_dir: '{tmp_path / 'cache'}'}}\n")
    r = run_cli("tokenizer", "train", str(recipe))
    assert r.returncode == 1
    assert r.stderr.strip() == f"lctrain: error: data: {path}: the file is empty", r.stderr
