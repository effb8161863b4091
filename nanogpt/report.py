"""Compare runs: ``python -m nanogpt.report PATH [PATH ...] [--out DIR]``.

- a run directory: ``loss_curve.png`` in it (train and val loss against
  iteration and against tokens seen);
- a sweep directory: ``summary.md``, ``summary.csv`` and ``val_loss.png`` in it
  (one row and one curve per job, best first); the table is printed;
- several paths (runs or sweeps): one comparison of all their runs, written to
  ``--out`` (default ``outputs/reports/<date>_<time>``).

The tables and plots are nanogpt/tracking/compare.py's; this command reads each
job's overrides (which keys a sweep varied) and prints what was written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanogpt.cli.overrides import job_overrides
from nanogpt.errors import UserError, exit_with_error
from nanogpt.tracking.compare import report


def main(argv: list[str] | None = None) -> None:
    """Entry point: parse the paths, report, print the table and the files written."""
    parser = argparse.ArgumentParser(
        prog="python -m nanogpt.report",
        description="Loss curves for a run; a table and plot comparing the runs of a sweep "
                    "or of several paths.",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="run or sweep directories")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write (default: in the run or sweep directory; for several "
                             "paths outputs/reports/<date>_<time>)")
    args = parser.parse_args(argv)
    try:
        text, written = report(args.paths, args.out, job_overrides)
    except UserError as error:
        exit_with_error(str(error))
    print(text)
    print("wrote " + ", ".join(str(path) for path in written), file=sys.stderr)


if __name__ == "__main__":
    main()
