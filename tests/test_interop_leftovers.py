"""A killed `lctrain export --format hf` / `lctrain import` leaves its temp (a whole model); the next
one next to it removes the temps of dead processes of this host, and keeps a live one's."""
import os
import socket
import subprocess
import sys

import pytest

from lctrain.config import recipe_from_dict
from lctrain.interop.hf import export_hf
from lctrain.models import build_model

pytest.importorskip("transformers")


def test_killed_hf_export_leftover_is_removed(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    host = socket.gethostname()
    stale, live = tmp_path / f"hf.tmp-{p.pid}@{host}", tmp_path / f"other.tmp-{os.getppid()}@{host}"
    for d in (stale, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 1000)
    recipe = recipe_from_dict({"model": {"arch": "mamba2", "vocab_size": 64, "d_model": 32, "n_layers": 1,
                                         "mixers": {"mamba2": {"d_state": 8, "headdim": 16}}}})
    export_hf(build_model(recipe.model), None, str(tmp_path / "hf"))
    assert sorted(os.listdir(tmp_path)) == sorted(["hf", live.name])
    assert os.path.isfile(tmp_path / "hf" / "config.json")
