"""`threads` (params.yaml) is part of every computing stage's definition: CPU kernels split their work per thread
and the split changes the last bits of a training (1 vs 2 threads: the demo's weights differ from step 2 on), so
DVC must see it, and each stage must compute with exactly the configured count."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import BIN, REPO, tiny_owt_params
from tests.test_pipeline import copy_project

# The stages that compute with torch floats (the judge of `evaluate` too) must list `threads`; a new such stage
# lists it too. prepare, tokenizer and tokenize compute no floats: a thread count must not rerun them.
THREADED = {"encoder", "embed", "train", "sample", "evaluate"}
UNTHREADED = {"prepare", "tokenizer", "tokenize"}


def sh(*cmd: str, cwd: Path, env: dict | None = None) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _stage_outputs(dvc_yaml: dict, datasets: list[str]) -> list[str]:
    """Every path a stage writes (outs, metrics, plots), `${key}` expanded over the datasets."""
    paths = []
    for stage in dvc_yaml["stages"].values():
        body, keys = (stage["do"], datasets) if "foreach" in stage else (stage, [None])
        for section in ("outs", "metrics", "plots"):
            for entry in body.get(section, []):
                path = entry if isinstance(entry, str) else next(iter(entry))
                paths += [path.replace("${key}", key) if key else path for key in keys]
    return paths


def test_changing_threads_marks_every_computing_stage_stale(tmp_path):
    """The real dvc.yaml: a stage whose params list `threads` is out of date when it changes, the others not."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert isinstance(params["threads"], int), "the demo fixes its thread count (results depend on it)"
    repo = tmp_path / "repo"
    copy_project(repo)
    # Stand-ins for every stage's outputs, committed as they are: a lock file without running the pipeline.
    datasets = list(params["datasets"])
    for path in _stage_outputs(yaml.safe_load((repo / "dvc.yaml").read_text()), datasets):
        target = repo / path
        if target.suffix:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("step,loss\n0,1\n" if target.suffix == ".csv" else "{}\n")
        else:
            target.mkdir(parents=True, exist_ok=True)
            (target / "stand-in").write_text(path)
    dvc = str(BIN / "dvc")
    sh("git", "init", "-q", cwd=repo)
    sh(dvc, "init", "-q", cwd=repo)
    sh(dvc, "commit", "-f", cwd=repo)
    assert json.loads(sh(dvc, "status", "--json", cwd=repo)) == {}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    recorded = {name for name, stage in lock.items() if "threads" in stage.get("params", {}).get("params.yaml", {})}
    per_dataset = {name for name, stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].items()
                   if "foreach" in stage}
    names = lambda stages: {f"{s}@{key}" if s in per_dataset else s for s in stages for key in datasets}  # noqa: E731
    assert names(THREADED) <= recorded and not names(UNTHREADED) & recorded, recorded

    changed = dict(params, threads=params["threads"] + 1)
    (repo / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    stale = json.loads(sh(dvc, "status", "--json", cwd=repo))
    assert set(stale) == recorded, stale
    for name in stale:
        assert stale[name] == [{"changed deps": {"params.yaml": {"threads": "modified"}}}], stale[name]


SPY = """
import json, sys, torch
import elf.step
from elf.cli import main

seen = set()
step = elf.step.TrainStep.__call__
def spy(self, batch, index):
    seen.add(torch.get_num_threads())
    return step(self, batch, index)
elf.step.TrainStep.__call__ = spy
for args in json.loads(sys.argv[1]):
    assert main(args) == 0, args
print("threads during the training steps:", json.dumps(sorted(seen)))
"""


def test_training_steps_run_on_the_configured_thread_count(tmp_path):
    """`elf train` computes every step with `threads` threads, whatever OMP_NUM_THREADS says (1 in the tests);
    the thread count is part of a CPU run's fingerprint, so the second training does not resume the first's
    finished checkpoints (it would run no step) but sets them aside and trains anew."""
    params = tiny_owt_params()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"}
    stages = [["prepare", "owt"], ["tokenizer"], ["tokenize", "owt"], ["encoder"], ["embed", "owt"], ["train", "owt"]]
    for threads, omp, run in ((2, "1", stages), (1, "3", stages[-1:])):
        params["threads"] = threads
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        out = sh(sys.executable, "-c", SPY, json.dumps(run), cwd=tmp_path, env={**env, "OMP_NUM_THREADS": omp})
        assert f"threads during the training steps: [{threads}]" in out, out
