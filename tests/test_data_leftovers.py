"""Killed tokenizations leave temp builds; the next build removes those of dead processes of this host."""
import json
import os
import socket
import subprocess
import sys

from lctrain.config import recipe_from_dict
from lctrain.data.dataset import prepare_data


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_killed_tokenization_leftovers_are_removed(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n" for i in range(40)))
    recipe = recipe_from_dict({
        "tokenizer": {"vocab_size": 300, "train_bytes": 100_000},
        "data": {"source": "jsonl", "paths": [str(path)], "val_fraction": 0.0, "num_workers": 1,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"seq_len": 16, "steps": 1}, "optim": {"warmup_steps": 0}})
    tokens, tok_dir = tmp_path / "cache" / "tokens", tmp_path / "cache" / "tokenizers"
    host, dead = socket.gethostname(), _dead_pid()
    stale = tokens / f"0123456789abcdef.tmp-{dead}@{host}"        # a SIGKILLed build (any key)
    live = tokens / f"fedcba9876543210.tmp-{os.getppid()}@{host}"  # a concurrent build
    remote = tokens / f"aaaaaaaaaaaaaaaa.tmp-{dead}@not-{host}"    # another machine's build (shared cache)
    for d in (stale, live, remote):
        d.mkdir(parents=True)
        (d / "train.bin").write_bytes(b"")
    tok_dir.mkdir()
    stale_tok = tok_dir / f"x.model.tmp-{dead}@{host}"
    stale_tok.write_bytes(b"")
    logs = []
    data = prepare_data(recipe, log=logs.append)
    assert not stale.exists() and not stale_tok.exists()
    assert live.is_dir() and remote.is_dir()
    assert any("leftover" in m and stale.name in m for m in logs), logs
    assert sorted(n for n in os.listdir(tokens) if ".tmp-" in n) == sorted([live.name, remote.name])
    assert os.path.isfile(os.path.join(data.cache_dir, "meta.json"))


def test_a_dead_tokenization_worker_is_an_error_not_a_hang(tmp_path, monkeypatch):
    """A worker killed mid-batch (OOM killer) must fail the build, not leave it waiting forever."""
    import threading

    import pytest

    from lctrain.data import dataset
    from lctrain.data.tokenizer import Tokenizer, train_tokenizer
    tok = train_tokenizer(iter(["def f(x):\n    return x\n"] * 50), str(tmp_path / "t.model"), 280, 100_000)
    monkeypatch.setattr(Tokenizer, "encode_batch", lambda *a, **k: os._exit(9))   # runs in the forked workers only
    docs = [(str(i), "def f(x): return x\n") for i in range(200)]
    outcome = []

    def consume():
        try:
            list(dataset.encoded_documents(docs, tok, workers=2))
        except BaseException as e:   # noqa: BLE001 - the test inspects it
            outcome.append(e)

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "tokenization hangs after a worker died"
    assert outcome and isinstance(outcome[0], RuntimeError), outcome
    with pytest.raises(RuntimeError, match="tokenization worker died"):
        raise outcome[0]
