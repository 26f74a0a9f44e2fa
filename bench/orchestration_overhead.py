"""What Prefect costs on top of DVC: `train-elf/local` against the same `dvc repro` run directly.

    python bench/orchestration_overhead.py [--repeat 2] [--steps 4]

On the tests' tiny demo configuration (data stages built once, outside the timings), each repetition takes
two fresh copies of the project and times
  - direct: `dvc repro evaluate@owt` (embed, train, sample, evaluate of owt), and
  - flow:   `prefect deployment run train-elf/local --param dataset=owt --param project_dir=<copy> --watch`
            through the setup users get from `make orchestrate` (`python -m flows.setup local`: a background
            server, a process worker polling every second), from the command's start to its exit.
Ratio = flow / direct (median over repetitions); goal ≤ 1.2. The tiny run is a worst case: the fixed costs
(worker poll, a Python process for the flow run, one `dvc` start per step, API calls) do not grow with
training time, so on a real run the ratio tends to 1 (`--steps` lengthens training to show it).

Queue latency: two runs (owt, wmt14, training only) are submitted together under a `gpu` limit of 1; the
`ELF_GPU_LEDGER` records say how long after the first run released the slot the second one got it.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_orchestration import orchestration_params  # noqa: E402  (the tests' tiny configuration)
from tests.test_pipeline import PROJECT_FILES  # noqa: E402

BIN = Path(sys.executable).parent


def run(*cmd: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-2000:]}\n"
                         f"{result.stderr[-2000:]}")
    return result


def timed(*cmd: str, cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    run(*cmd, cwd=cwd, env=env)
    return time.perf_counter() - start


def build_template(root: Path, env: dict[str, str], steps: int) -> Path:
    """The project with the tiny configuration (`steps` training steps), its data stages built by `dvc repro`."""
    template = root / "template"
    template.mkdir()
    for name in PROJECT_FILES + ["prefect.yaml"]:
        shutil.copy(ROOT / name, template / name)
    for package in ("elf", "flows"):
        shutil.copytree(ROOT / package, template / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = orchestration_params()
    params["train"]["defaults"].update(steps=steps, checkpoint_every=max(2, steps // 2))
    (template / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git", "init", "-q", cwd=template, env=env)
    run(str(BIN / "dvc"), "init", "-q", cwd=template, env=env)
    run("git", "add", "-A", cwd=template, env=env)
    run("git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "init", cwd=template, env=env)
    run(str(BIN / "dvc"), "repro", "embed@owt", "embed@wmt14", cwd=template, env=env)
    return template


def copy(template: Path, name: str) -> Path:
    target = template.parent / name
    shutil.copytree(template, target, symlinks=True)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deployment_run(project: Path, env: dict[str, str], *params: str) -> subprocess.Popen:
    args = [str(BIN / "prefect"), "deployment", "run", "train-elf/local", "--watch", "--param",
            f"project_dir={project}"]
    for param in params:
        args += ["--param", param]
    return subprocess.Popen(args, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> str:
    """Wait for `prefect deployment run --watch`; return the flow run id."""
    output = process.communicate()[0]
    if process.returncode != 0:
        raise SystemExit(f"deployment run failed:\n{output[-3000:]}")
    return re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)


def phases(api_url: str, flow_run_id: str) -> dict[str, float]:
    """Where a flow run's time went, from the server's record: queued (created → running, i.e. worker poll
    and flow-run process start) and running (start → end)."""
    with urllib.request.urlopen(f"{api_url}/flow_runs/{flow_run_id}", timeout=10) as response:
        run = json.load(response)
    created, start, end = (datetime.fromisoformat(run[key]) for key in ("created", "start_time", "end_time"))
    return {"to_running_s": round((start - created).total_seconds(), 1),
            "running_s": round((end - start).total_seconds(), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="training steps (4: the tests' configuration)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="elf-orchestration-bench-") as tmp:
        root = Path(tmp)
        ledger = root / "gpu-ledger.jsonl"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
        env.update(PREFECT_HOME=str(root / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   DO_NOT_TRACK="1", DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1",
                   HF_HUB_DISABLE_TELEMETRY="1", ELF_GPU_LEDGER=str(ledger),
                   PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
        template = build_template(root, env, args.steps)
        deployed = copy(template, "deployed")
        port = free_port()
        api_url = f"http://127.0.0.1:{port}/api"
        setup_start = time.perf_counter()
        run(sys.executable, "-m", "flows.setup", "local", "--port", str(port), "--gpus", "1", cwd=deployed, env=env)
        setup_s = time.perf_counter() - setup_start
        try:
            direct, flow, flow_phases = [], [], []
            for rep in range(args.repeat):
                direct.append(timed(str(BIN / "dvc"), "repro", "evaluate@owt", cwd=copy(template, f"direct-{rep}"),
                                    env=env))
                start = time.perf_counter()
                flow_run_id = finish(deployment_run(copy(template, f"flow-{rep}"), env, "dataset=owt"))
                flow.append(time.perf_counter() - start)
                flow_phases.append(phases(api_url, flow_run_id))

            queued = copy(template, "queued")
            ledger.unlink(missing_ok=True)
            runs = [deployment_run(queued, env, f"dataset={name}", "evaluate=false") for name in ("owt", "wmt14")]
            for process in runs:
                finish(process)
            holds = sorted((json.loads(line) for line in ledger.read_text().splitlines()), key=lambda h: h["acquired"])
            first, second = holds
        finally:
            run(sys.executable, "-m", "flows.setup", "stop", cwd=deployed, env=env)
    ratios = [f / d for f, d in zip(flow, direct, strict=True)]
    print(json.dumps({
        "config": f"tests' tiny demo configuration (owt: {args.steps} training steps, 1 sampler × 4 samples)",
        "setup_s": round(setup_s, 1),
        "direct_dvc_repro_s": [round(t, 1) for t in direct],
        "train_elf_local_s": [round(t, 1) for t in flow],
        "train_elf_local_phases": flow_phases,
        "overhead_s": round(statistics.median(flow) - statistics.median(direct), 1),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_goal": 1.2,
        "queued_run": {
            "overlap": first["released"] > second["acquired"],
            "asked_while_busy": second["asked"] < first["released"],
            "started_after_release_s": round(second["acquired"] - first["released"], 2),
            "waited_s": round(second["acquired"] - second["asked"], 1),
            "first_hold_s": round(first["released"] - first["acquired"], 1),
        },
    }, indent=2))


if __name__ == "__main__":
    main()
