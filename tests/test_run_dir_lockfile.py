"""A refused start leaves a run directory byte-identical even when it had no `.lock` yet (a directory
the user made, a run written before the lock existed, a copy without dotfiles): the lock file the
refused start created is removed again."""
import os

from tests.rundir_utils import error_line, recipe_file, snapshot, train_cli


def test_refused_start_in_a_dir_without_a_lock_file_leaves_it_untouched(tmp_path):
    recipe = recipe_file(tmp_path / "r.yaml", str(tmp_path / "cache"), steps=1, every=1)
    for name, content in (("empty", None), ("notes", b"my notes\n")):
        run = tmp_path / name
        run.mkdir()
        if content:
            (run / "README.txt").write_bytes(content)
        before = snapshot(str(run))
        line = error_line(train_cli(recipe, str(run), "--resume", "/nonexistent/ckpt"))
        assert "no checkpoint found at /nonexistent/ckpt" in line, line
        assert snapshot(str(run)) == before, sorted(os.listdir(run))
