"""How wide `dvc exp show --only-changed` is after a one-parameter experiment (goal: at most 25 columns).

    PATH=.venv/bin:$PATH python -m bench.exp_columns [--set train.datasets.xsum.steps=710]

Run from the repository root after `make demo`. The experiment runs in a temporary copy of the workspace
(`dvc exp run --temp`), so the workspace is left as it was, and it is removed at the end. Prints the columns.
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess

NAME = "bench-exp-columns"


def dvc(*args: str) -> str:
    return subprocess.run(["dvc", *args], check=True, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="train.datasets.xsum.steps=710", help="the one parameter to change")
    args = parser.parse_args()
    dvc("exp", "run", "--temp", "--name", NAME, "-S", args.set)
    try:
        header = next(csv.reader(io.StringIO(dvc("exp", "show", "--only-changed", "--csv"))))
    finally:
        dvc("exp", "remove", NAME)
    # The csv adds `rev` and `typ` beside the `Experiment` and `Created` columns that the table shows.
    shown = [column for column in header if column not in ("rev", "typ")]
    print(f"dvc exp show --only-changed after -S {args.set}: {len(shown)} columns")
    print(", ".join(shown))


if __name__ == "__main__":
    main()
