"""The torchrun entry point: `python -m lctrain.train.worker train RECIPE ...` runs `lctrain.cli` and
then ends the process the way gloo needs (DESIGN.md §5): destroy the process group, flush, and
`os._exit` with the command's exit code, so an abort in gloo's exit-time teardown cannot turn a good
run into a failure (which torchrun would answer with a restart)."""
from __future__ import annotations

import os
import sys
import traceback


def main(argv=None) -> int:
    code = 1
    try:
        from lctrain.cli import main as cli_main
        code = cli_main(argv if argv is not None else sys.argv[1:])
    except SystemExit as e:           # argparse errors
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:
        traceback.print_exc()           # a bug: the whole traceback, and its last line for the launcher
        from lctrain.cli import report_error
        if os.environ.get("LCTRAIN_LAUNCHER"):
            report_error(f"lctrain: error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                         f" (traceback above)", 1)
        code = 1
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    return int(code)


if __name__ == "__main__":
    os._exit(main())
