"""`kill -9` at random points of every stage: how many kills left a torn output, how many reruns recovered,
how many ended identical to a clean run.

    python -m bench.kill_sweep [--trials 5] [--seed 0]

Builds the tests' small owt-only project once, then for each stage: a clean run (the reference and its wall
time T, process start included), then `--trials` times a fresh copy whose run is killed after a delay drawn
uniformly from [0.4·T, T) (the first ~40% is Python importing torch), and a rerun. Prints one row per
stage and the totals.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

from tests.conftest import STAGES, inside, tiny_owt_params
from tests.test_kill import OUTPUTS, contents, elf, fresh_copy, temporaries


def build(root: Path) -> Path:
    import yaml

    from elf.cli import main

    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_owt_params(), sort_keys=False))
    with inside(root):
        for args in STAGES:
            assert main(args) == 0, args
    return root


def sweep(built: Path, work: Path, stage: str, trials: int, rng: random.Random) -> dict[str, int]:
    args = [stage] + ([] if stage in ("tokenizer", "encoder") else ["owt"])
    outputs, compare = OUTPUTS[stage]
    clean = fresh_copy(built, work / f"{stage}-clean", stage)
    started = time.monotonic()
    assert elf(clean, *args).wait() == 0
    duration = time.monotonic() - started
    reference = contents(clean, outputs, compare)
    counts = dict(kills=0, finished_first=0, temporary_at_kill=0, torn=0, recovered=0, identical=0)
    for trial in range(trials):
        copy = fresh_copy(built, work / f"{stage}-{trial}", stage)
        process = elf(copy, *args)
        time.sleep(rng.uniform(0.4 * duration, duration))
        if process.poll() is None:
            counts["temporary_at_kill"] += bool(temporaries(copy))
            process.kill()
            counts["kills"] += 1
        else:
            counts["finished_first"] += 1
        process.wait()
        after = contents(copy, outputs, compare)
        counts["torn"] += any(after[name] != reference.get(name) for name in after)
        counts["recovered"] += elf(copy, *args).wait() == 0
        counts["identical"] += contents(copy, outputs, compare) == reference and not temporaries(copy)
        shutil.rmtree(copy)
    counts["seconds"] = round(duration, 1)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5, help="kills per stage")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="elf-kill-sweep-") as tmp:
        built = build(Path(tmp) / "built")
        rows = {stage: sweep(built, Path(tmp), stage, args.trials, rng) for stage in OUTPUTS}
    columns = ["seconds", "kills", "finished_first", "temporary_at_kill", "torn", "recovered", "identical"]
    print(f"{'stage':10s}" + "".join(f"{c:>19s}" for c in columns))
    for stage, row in rows.items():
        print(f"{stage:10s}" + "".join(f"{row[c]:>19}" for c in columns))
    totals = {c: sum(row[c] for row in rows.values()) for c in columns[1:]}
    print(f"{'total':10s}{'':>19s}" + "".join(f"{totals[c]:>19}" for c in columns[1:]))


if __name__ == "__main__":
    main()
