"""A failing rank under the launch scripts (issue 14, item 13): the output ends with the failing rank's own
one-line error and one summary line naming the rank and its status; no torchrun ChildFailedError
traceback or failure table; the launcher exits with the rank's status."""
import re

import pytest

from tests.zero_utils import launcher_env, run_launch, write_recipe

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and "Warning" not in line
            and not line.startswith("  return func")]          # torch's FutureWarnings are not ours


def test_every_rank_failing_alike_gives_one_error_and_a_summary(tmp_path):
    # every worker refuses the same bad setting: one copy of the error, not one per rank
    res = run_launch("single_node.sh", write_recipe(tmp_path / "r.yaml"), "--nproc-per-node", 2,
                     "--run-dir", tmp_path / "run", env=launcher_env(LCTRAIN_FAULT="bogus"), timeout=240)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "ChildFailedError" not in res.stderr
    lines = _lines(res.stderr)
    assert lines[0].startswith("lctrain: error: LCTRAIN_FAULT: expected kill:STEP:RANK"), lines
    assert len(lines) == 2, lines          # whichever rank failed first: the same error is not repeated
    assert re.match(r"lctrain launch: rank [01] exited with status 2", lines[1]), lines


def test_a_killed_rank_is_named_in_the_summary(tmp_path):
    res = run_launch("single_node.sh", write_recipe(tmp_path / "r.yaml"), "--nproc-per-node", 2,
                     "--run-dir", tmp_path / "run", env=launcher_env(LCTRAIN_FAULT="kill:2:1"), timeout=240)
    assert res.returncode == 137, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "ChildFailedError" not in res.stderr
    lines = _lines(res.stderr)
    assert lines[-1].startswith("lctrain launch: rank 1 was killed by SIGKILL"), lines
    assert all(line.startswith("lctrain") for line in lines), lines     # the survivor's view, then the summary
