"""`kill -9` at any point of any stage loses at most the work since the last checkpoint: no torn output is
left where a later stage or DVC would take it for a finished one, and the rerun ends where a run that
was never killed ends (the tokenize, embed and train stages have deeper kill tests of their own).

Each stage is run clean (the reference, and its duration T), then again in a fresh copy and killed at the
first sight of its temporary output or at 0.9·T, whichever comes first, then rerun to completion.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from elf.files import atomic_file, atomic_output_dir
from tests.conftest import BIN

pytestmark = pytest.mark.slow


def text_of_samples(path: Path) -> list:
    return [(row["sampler"], row["seed"], row["index"], row["text"]) for row in map(json.loads, path.open())]


def primary_of(path: Path) -> dict:
    return json.loads(path.read_text())["primary"]


# stage: (outputs that must come out identical, how to compare a file; None = bytes)
OUTPUTS = {
    "prepare": (["data/raw/owt"], None),
    "tokenizer": (["data/tokenizer"], None),
    "tokenize": (["data/tokens/owt"], None),
    "encoder": (["data/encoder"], None),
    "embed": (["data/embeddings/owt"], None),
    "judge": (["data/judge/owt"], None),
    "train": (["models/owt/model/model.safetensors", "models/owt/checkpoints/step-000002/ema.safetensors"], None),
    "sample": (["samples/owt.jsonl"], text_of_samples),
    "evaluate": (["metrics/owt/eval.json"], primary_of),
}
REMOVE_BEFORE = {"train": ["models/owt"], "evaluate": ["metrics/owt"]}


def is_temporary(path: Path) -> bool:
    return ".tmp" in path.name or ".old-" in path.name


def files_under(root: Path, outputs: list[str]) -> list[Path]:
    """The finished files of `outputs` (a killed write's temporary leftovers are not outputs)."""
    found = []
    for name in outputs:
        path = root / name
        found += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [p for p in found if not any(is_temporary(part) for part in [p, *p.parents])]


def contents(root: Path, outputs: list[str], compare) -> dict:
    return {p.relative_to(root).as_posix(): (compare(p) if compare else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in files_under(root, outputs) if p.exists()}


def temporaries(root: Path) -> list[str]:
    """Temporary names under `root`; os.walk, unlike rglob, shrugs off directories vanishing while it looks."""
    return [os.path.relpath(os.path.join(folder, name), root) for folder, dirs, files in os.walk(root)
            for name in dirs + files if is_temporary(Path(name))]


def elf(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "elf"), *args], cwd=project, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def fresh_copy(built: Path, directory: Path, stage: str) -> Path:
    shutil.copytree(built, directory)
    for name in OUTPUTS[stage][0] + REMOVE_BEFORE.get(stage, []):
        path = directory / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return directory


@pytest.mark.parametrize("stage", list(OUTPUTS))
def test_a_kill_at_any_point_leaves_no_torn_output_and_the_rerun_matches_a_clean_run(built, tmp_path, stage):
    args = [stage] + ([] if stage in ("tokenizer", "encoder") else ["owt"])
    outputs, compare = OUTPUTS[stage]

    clean = fresh_copy(built, tmp_path / "clean", stage)
    started = time.monotonic()
    process = elf(clean, *args)
    assert process.wait() == 0, process.stderr.read()
    duration = time.monotonic() - started
    reference = contents(clean, outputs, compare)
    assert reference

    killed = fresh_copy(built, tmp_path / "killed", stage)
    process = elf(killed, *args)
    deadline = time.monotonic() + 0.9 * duration
    while process.poll() is None and time.monotonic() < deadline and not temporaries(killed):
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    # Whatever the kill interrupted, every output present is complete: absent, or what a clean run writes.
    after_kill = contents(killed, outputs, compare)
    assert all(after_kill[name] == reference[name] for name in after_kill), (stage, sorted(after_kill))

    rerun = elf(killed, *args)
    assert rerun.wait() == 0, rerun.stderr.read()
    assert contents(killed, outputs, compare) == reference
    assert temporaries(killed) == []


SLOW_WRITER = """
import sys, time
from pathlib import Path
from elf.files import atomic_file, atomic_output_dir
kind, target = sys.argv[1], Path(sys.argv[2])
with (atomic_file(target) if kind == "file" else atomic_output_dir(target)) as tmp:
    path = tmp if kind == "file" else tmp / "part"
    with open(path, "w") as handle:
        handle.write("half")
        handle.flush()
        print("writing", flush=True)
        time.sleep(60)
"""


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_a_kill_in_the_middle_of_a_write_leaves_the_old_output_and_the_next_write_cleans_up(tmp_path, kind):
    """What every stage's writes rely on (elf/files.py): the kill lands inside the write, deterministically."""
    target = tmp_path / "out"
    with atomic_file(target) if kind == "file" else atomic_output_dir(target) as tmp:
        (tmp if kind == "file" else tmp / "part").write_text("old")
    writer = subprocess.Popen([str(BIN / "python"), "-c", SLOW_WRITER, kind, str(target)], stdout=subprocess.PIPE,
                              text=True)
    assert writer.stdout.readline() == "writing\n"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    read = (lambda: target.read_text()) if kind == "file" else (lambda: (target / "part").read_text())
    assert read() == "old" and len(list(tmp_path.iterdir())) == 2  # the output and the killed write's leftover
    with atomic_file(target) if kind == "file" else atomic_output_dir(target) as tmp:
        (tmp if kind == "file" else tmp / "part").write_text("new")
    assert read() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_off_a_terminal_stages_print_log_lines_not_progress_bars(built, tmp_path):
    """Under DVC and a Prefect worker every progress-bar redraw would become a log line of its own."""
    import yaml

    project = tmp_path / "project"
    shutil.copytree(built, project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["defaults"].update(steps=4)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["tokenize", "owt"], ["train", "owt"], ["sample", "owt"]):
        result = subprocess.run([str(BIN / "elf"), *args], cwd=project, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "it/s" not in result.stderr and "%|" not in result.stderr, result.stderr[-1000:]
        if args[0] == "train":
            assert "train owt: step 3/4 loss" in result.stdout and "train owt: step 4/4 loss" in result.stdout


def test_rerunning_sample_and_evaluate_writes_byte_identical_outputs(built, tmp_path):
    """No timings in DVC-tracked outputs: they would change every hash on a rerun (timings go to MLflow)."""
    from elf.cli import main
    from tests.conftest import inside, mlflow_store_in

    project = tmp_path / "project"
    shutil.copytree(built, project)
    outputs = ["samples/owt.jsonl", "metrics/owt/eval.json", "metrics/owt/headline.json", "metrics/owt/samplers.csv"]
    with inside(project), mlflow_store_in(project):
        assert main(["sample", "owt"]) == 0 and main(["evaluate", "owt"]) == 0
        first = {name: (project / name).read_bytes() for name in outputs}
        assert main(["sample", "owt"]) == 0 and main(["evaluate", "owt"]) == 0
    assert {name: (project / name).read_bytes() for name in outputs} == first
    assert b"seconds" not in first["samples/owt.jsonl"] and b'"samples_per_s"' not in first["metrics/owt/eval.json"]
