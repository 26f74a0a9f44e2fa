"""Prefect flows over `dvc repro`, against real servers on 127.0.0.1 (started and stopped here).

One Prefect server and one tiny demo project (data stages built once, then copied per test) serve the
module. `python -m flows.setup local` deploys and starts a process worker exactly as a user's
`make orchestrate` would; `prefect deployment run train-elf/local` then runs with a fault injected into
the first training attempt. Flows that need no deployment run in-process through their CLI entry points.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from flows.stages import PermanentStageError, StageFailed, apply_overrides, check_dataset, classify
from tests.conftest import BIN, REPO
from tests.test_pipeline import PROJECT_FILES, tiny_params

DATASETS = ("owt", "wmt14")
BAD_BATCH_ERROR = "error: params.yaml: train micro_batch_size 3 does not divide the per-process batch 8"


def orchestration_params() -> dict:
    """tiny_params() with two datasets, a Gaussian encoder, 4 training steps (checkpoints at 2 and 4) and one
    short sampler."""
    params = tiny_params()
    for section in (params["datasets"], params["embed"]["cache"], params["train"]["datasets"],
                    params["sample"]["samplers"]):
        for name in [n for n in section if n not in DATASETS]:
            del section[name]
    params["encoder"].update(kind="gaussian", gaussian_dim=32)  # the orchestration needs no trained encoder
    params["train"]["defaults"].update(steps=4, batch_size=8, checkpoint_every=2, log_every=1,
                                       model={"depth": 1, "hidden": 32, "heads": 2})
    sample = params["sample"]
    sample.update(num_samples=4, seeds=[0])
    sample["samplers"] = {name: [{**specs[0], "steps": 4}] for name, specs in sample["samplers"].items()}
    return params


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except (OSError, urllib.error.URLError):
            if process is not None and process.poll() is not None:
                raise AssertionError(f"server for {url} exited with {process.returncode}") from None
            time.sleep(0.3)
    raise AssertionError(f"{url} not healthy after {timeout} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def sh(*cmd: str, cwd: Path, env: dict | None = None, check: bool = True, timeout: float = 300
       ) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def api(base: str, method: str, path: str, body: dict | None = None):
    request = urllib.request.Request(f"{base}{path}", method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


# -- fast checks (no servers) -------------------------------------------------------------------------------------


def test_a_stage_exiting_2_is_permanent_and_carries_its_error_line():
    lines = ["Running stage 'train@owt':", "> elf train owt", "error: params.yaml: train batch_size 9 is odd",
             "ERROR: failed to reproduce 'train@owt': failed to run: elf train owt, exited with 2"]
    error = classify(255, lines, ["repro", "train@owt"])
    assert isinstance(error, PermanentStageError) and str(error) == "error: params.yaml: train batch_size 9 is odd"
    killed = classify(255, lines[:2] + ["ERROR: failed to reproduce 'train@owt': failed to run: elf train owt, "
                                        "exited with -9"], ["repro", "train@owt"])
    assert isinstance(killed, StageFailed) and "exited with -9" in str(killed)
    busy = classify(255, ["ERROR: failed to reproduce 'tokenize@wmt14': 'data/tokens/wmt14' is busy, it is being "
                          "blocked by:", "  (PID 7: dvc repro train@wmt14)", "", "If there are no processes"],
                    ["repro", "embed@owt"])
    assert isinstance(busy, StageFailed)
    assert str(busy).endswith("is busy, it is being blocked by: (PID 7: dvc repro train@wmt14)")


@pytest.mark.parametrize("status, permanent", [(3, True), (75, False)])
def test_a_full_disk_is_not_retried_and_a_passing_io_error_is(status, permanent):
    """elf/errors.py: 3 = the machine refuses the work (fix it first), 75 = a passing OS failure."""
    lines = ["> elf tokenize owt", "error: data/tokens/owt: No space left on device (free some space, then rerun)",
             f"ERROR: failed to reproduce 'tokenize@owt': failed to run: elf tokenize owt, exited with {status}"]
    error = classify(255, lines, ["repro", "tokenize@owt"])
    assert isinstance(error, PermanentStageError if permanent else StageFailed)
    assert "data/tokens/owt: No space left on device" in str(error)


def test_resume_false_moves_the_checkpoints_aside_and_never_deletes_them(tmp_path):
    from flows.train_elf import set_checkpoints_aside

    step = tmp_path / "models/owt/checkpoints/step-000004"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(b"weights")
    aside = set_checkpoints_aside(tmp_path, "owt")
    assert aside.parent == tmp_path / "models/owt.aside" and aside.name.startswith("fresh-start-")
    assert (aside / "step-000004/model.safetensors").read_bytes() == b"weights"
    assert list((tmp_path / "models/owt/checkpoints").iterdir()) == []
    assert set_checkpoints_aside(tmp_path, "owt") is None  # nothing left to move


def test_orchestrate_stop_takes_back_the_api_url_that_setup_saved_in_the_profile(tmp_path):
    """Else the documented non-deployment commands would try the stopped server (`make orchestrate-stop`)."""
    project = tmp_path / "project"
    shutil.copytree(REPO / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    url = "http://127.0.0.1:4299/api"

    def profile_api_url() -> str:
        code = ("from prefect.settings import PREFECT_API_URL, load_current_profile; "
                "print(load_current_profile().settings.get(PREFECT_API_URL))")
        return sh(sys.executable, "-c", code, cwd=project, env=env).stdout.strip()

    sh(sys.executable, "-c", f"from flows.setup import save_api_url_in_profile; save_api_url_in_profile({url!r})",
       cwd=project, env=env)
    assert profile_api_url() == url
    stopped = sh(sys.executable, "-m", "flows.setup", "stop", cwd=project, env=env)
    assert f"PREFECT_API_URL={url} removed from the active Prefect profile" in stopped.stdout + stopped.stderr
    assert profile_api_url() == "None" and not (project / ".prefect/profile-api-url").exists()


def test_overrides_are_validated_before_params_yaml_changes(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    params = tmp_path / "params.yaml"
    params.write_text("# kept\n" + yaml.safe_dump(orchestration_params(), sort_keys=False))
    before = params.read_text()
    with pytest.raises(PermanentStageError, match=r"^error: params\.yaml: .*steps"):
        apply_overrides(tmp_path, {"train.defaults.steps": -1})
    assert params.read_text() == before
    with pytest.raises(PermanentStageError, match="unknown dataset 'nope'"):
        check_dataset(tmp_path, "nope")
    assert apply_overrides(tmp_path, {"train.defaults.steps": 6}) == ["train.defaults.steps=6"]
    assert yaml.safe_load(params.read_text())["train"]["defaults"]["steps"] == 6
    # A nested override merges into its section rather than replacing it.
    assert apply_overrides(tmp_path, {"train": {"defaults": {"model": {"depth": 2}}}}) == [
        "train.defaults.model.depth=2"]
    assert yaml.safe_load(params.read_text())["train"]["defaults"]["model"] == {"depth": 2, "hidden": 32, "heads": 2}
    assert params.read_text().startswith("# kept\n")


def test_cluster_deployment_uses_only_job_variables_of_the_gpu_template():
    from flows.setup import gpu_job_template

    template = gpu_job_template()
    deployments = {(d["entrypoint"], d["name"]): d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())
                   ["deployments"]}
    cluster = deployments[("flows/train_elf.py:train_elf", "cluster")]
    assert set(cluster["work_pool"]["job_variables"]) <= set(template["variables"]["properties"])
    # Render the pod as a kubernetes worker would: variable defaults, then the deployment's job variables.
    from prefect.utilities.templating import apply_values

    values = {name: spec["default"] for name, spec in template["variables"]["properties"].items() if "default" in spec}
    values.update(cluster["work_pool"]["job_variables"], image="registry.example/elf:1")
    pod = apply_values(template["job_configuration"], values)["job_manifest"]["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["memory"] == "64Gi" and "cpu" not in resources["limits"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["containers"][0]["image"] == "registry.example/elf:1"
    steps = [next(iter(step)) for step in cluster["pull"]]
    assert steps == ["prefect.deployments.steps.git_clone", "prefect.deployments.steps.run_shell_script"]
    assert "dvc pull" in cluster["pull"][1]["prefect.deployments.steps.run_shell_script"]["script"]
    assert cluster["parameters"]["push"] is True
    assert deployments[("flows/train_elf.py:train_elf", "local")]["work_pool"]["name"] == "elf-local"


# -- servers and a tiny project ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_env(tmp_path_factory) -> dict[str, str]:
    """Environment for every child process: offline, telemetry off, Prefect state in a temporary home."""
    home = tmp_path_factory.mktemp("prefect-home")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_RUNNER_POLL_FREQUENCY="1",
               PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS="1",
               PREFECT_LOGGING_COLORS="false")
    return env


# The data stages as their commands, in one process: the same code as `dvc repro` runs (test_pipeline.py runs
# them through DVC), without paying the interpreter and import start-up once per stage.
BUILD_DATA = """
import sys
from elf.cli import main
for argv in sys.argv[1:]:
    if main(argv.split()) != 0:
        sys.exit(f"elf {argv} failed")
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory, base_env):
    """A Prefect server with a `gpu` limit of 1, an MLflow server, and a template project whose data stages
    are built and recorded in dvc.lock (`dvc commit`, as for commands run by hand).

    Both servers boot while the data is built, so the waits overlap.
    """
    root = tmp_path_factory.mktemp("orchestration")
    port, mlflow_port = free_port(), free_port()
    api_url, mlflow_url = f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{mlflow_port}"
    logs = [open(root / name, "w") for name in ("prefect-server.log", "mlflow-server.log")]  # noqa: SIM115
    servers = [
        subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                          "--no-ui"], env={**base_env, "PREFECT_SERVER_UI_ENABLED": "false"}, stdout=logs[0],
                         stderr=subprocess.STDOUT),
        subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                          "--artifacts-destination", str(root / "mlartifacts"), "--host", "127.0.0.1", "--port",
                          str(mlflow_port), "--workers", "1"], cwd=root, env=base_env, stdout=logs[1],
                         stderr=subprocess.STDOUT),
    ]
    try:
        template = root / "template"
        template.mkdir()
        for name in PROJECT_FILES + ["prefect.yaml"]:
            shutil.copy(REPO / name, template / name)
        for package in ("elf", "flows", "data/input"):
            shutil.copytree(REPO / package, template / package, ignore=shutil.ignore_patterns("__pycache__"))
        (template / "params.yaml").write_text(yaml.safe_dump(orchestration_params(), sort_keys=False))
        sh("git", "init", "-q", cwd=template)
        sh(str(BIN / "dvc"), "init", "-q", cwd=template)
        sh("git", "add", "-A", cwd=template)
        sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=template)
        commands = [f"prepare {n}" for n in DATASETS] + ["tokenizer"] + [f"tokenize {n}" for n in DATASETS] + [
            "encoder"] + [f"embed {n}" for n in DATASETS]
        sh(sys.executable, "-c", BUILD_DATA, *commands, cwd=template, env=base_env)
        embeds = [f"embed@{name}" for name in DATASETS]
        sh(str(BIN / "dvc"), "commit", "--force", "--with-deps", *embeds, cwd=template, env=base_env)
        status = sh(str(BIN / "dvc"), "status", "--with-deps", *embeds, cwd=template, env=base_env)
        assert "up to date" in status.stdout, status.stdout
        wait_http(f"{api_url}/health", 120, servers[0])
        wait_http(f"{mlflow_url}/health", 120, servers[1])
        api(api_url, "POST", "/v2/concurrency_limits/", {"name": "gpu", "limit": 1})
        yield {"api_url": api_url, "mlflow_url": mlflow_url, "mlflow_server": servers[1], "template": template,
               "root": root, "env": {**base_env, "PREFECT_API_URL": api_url}}
    finally:
        for server in servers:
            stop(server)
        for log in logs:
            log.close()


def copy_project(stack, name: str) -> Path:
    target = stack["root"] / name
    shutil.copytree(stack["template"], target, symlinks=True)
    return target


def fault_injecting_bin(directory: Path, marker: Path) -> Path:
    """An `elf` in front of the real one: its first `elf train` trains 2 steps (checkpoint step-000002) and
    then exits 137, as a killed process would; every later call is the real command."""
    directory.mkdir(parents=True)
    script = directory / "elf"
    script.write_text(f"""#!/bin/sh
if [ "$1" = "train" ] && [ ! -e "{marker}" ]; then
    touch "{marker}"
    "{BIN / 'elf'}" "$@" --stop-after 2 || exit $?
    echo "fault injection: process killed after the step-2 checkpoint" >&2
    exit 137
fi
exec "{BIN / 'elf'}" "$@"
""")
    script.chmod(0o755)
    return directory


@pytest.fixture(scope="module")
def deployed_run(stack):
    """`flows.setup local` (pool, limit, deployments, worker), then `prefect deployment run train-elf/local`
    with a fault in the first training attempt; the stages log to the MLflow server over HTTP."""
    project = copy_project(stack, "deployed")
    ledger = stack["root"] / "deployed-gpu.jsonl"
    fault_bin = fault_injecting_bin(stack["root"] / "fault-bin", stack["root"] / "fault-injected")
    env = {**stack["env"], "ELF_GPU_LEDGER": str(ledger), "PATH": f"{fault_bin}:{BIN}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": stack["mlflow_url"]}
    try:
        setup = sh(sys.executable, "-m", "flows.setup", "local", "--gpus", "1", "--query-seconds", "1",
                   cwd=project, env=env)
        run = sh(str(BIN / "prefect"), "deployment", "run", "train-elf/local", "--param", "dataset=owt",
                 "--param", "retry_delay_seconds=0", "--watch", "--watch-timeout", "400", cwd=project, env=env,
                 check=False, timeout=420)
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)
        yield {"project": project, "setup": setup, "run": run, "flow_run_id": flow_run_id, "ledger": ledger,
               "worker_log": project / ".prefect" / "worker.log"}
    finally:
        sh(sys.executable, "-m", "flows.setup", "stop", cwd=project, env=env, check=False)


# -- end to end ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_deployment_run_retries_a_killed_training_and_resumes_from_its_checkpoint(stack, deployed_run):
    run, project = deployed_run["run"], deployed_run["project"]
    log = deployed_run["worker_log"].read_text()
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{log[-5000:]}"
    assert "ready: prefect deployment run train-elf/local" in deployed_run["setup"].stdout

    # The first attempt died after its step-2 checkpoint; the retry resumed there instead of starting over.
    assert "fault injection: process killed after the step-2 checkpoint" in log
    assert "exited with 137" in log
    assert "resuming at step 2" in log
    task_runs = api(stack["api_url"], "POST", "/task_runs/filter",
                    {"flow_runs": {"id": {"any_": [deployed_run["flow_run_id"]]}}})
    by_name = {t["name"]: t for t in task_runs}
    assert by_name["train owt"]["run_count"] == 2 and by_name["train owt"]["state_type"] == "COMPLETED"
    assert by_name["data owt"]["run_count"] == 1 and by_name["evaluate owt"]["state_type"] == "COMPLETED"

    # Outputs exist, and dvc.lock describes them: DVC has nothing left to do for this dataset.
    assert (project / "models/owt/model/model.safetensors").is_file()
    assert (project / "models/owt/checkpoints/step-000004").is_dir()
    assert len((project / "samples/owt.jsonl").read_text().splitlines()) == 4
    assert json.loads((project / "metrics/owt/train.json").read_text())["steps"] == 4
    assert (project / "metrics/owt/eval.json").is_file()
    status = sh(str(BIN / "dvc"), "status", "--with-deps", "evaluate@owt", cwd=project, env=stack["env"])
    assert "up to date" in status.stdout, status.stdout

    # The flow linked the MLflow run.
    run_id = (project / "models/owt/mlflow_run_id").read_text().strip()
    url = stack["mlflow_url"]
    assert re.search(rf"MLflow run {run_id} in {url} → {url}/#/experiments/\d+/runs/{run_id}", log), log[-3000:]
    holds = [json.loads(line) for line in deployed_run["ledger"].read_text().splitlines()]
    assert [h["step"] for h in holds] == ["train", "train", "evaluate"]

    # The evaluation is on the flow run as a table, one row per sampler, with the MLflow run linked.
    artifacts = api(stack["api_url"], "POST", "/artifacts/filter",
                    {"artifacts": {"flow_run_id": {"any_": [deployed_run["flow_run_id"]]}}})
    table = next(a for a in artifacts if a["key"] == "evaluation-owt")
    samplers = json.loads(project.joinpath("metrics/owt/eval.json").read_text())["samplers"]
    rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    assert table["type"] == "table" and [row["sampler"] for row in rows] == list(samplers)
    assert run_id in table["description"] and "gen_ppl" in table["description"]


@pytest.mark.slow
def test_mlflow_server_serves_the_training_run(stack, deployed_run):
    """The stages logged through the server: REST finds the run, its metrics, model files and registry entry."""
    url, project = stack["mlflow_url"], deployed_run["project"]
    run_id = (project / "models/owt/mlflow_run_id").read_text().strip()
    experiment = api(url, "GET", "/api/2.0/mlflow/experiments/get-by-name?experiment_name=elf-owt")["experiment"]
    found = api(url, "POST", "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]]})
    runs = {r["info"]["run_id"]: r for r in found["runs"]}
    assert run_id in runs and runs[run_id]["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in runs[run_id]["data"]["metrics"]}
    assert "loss" in metrics and "eval/sde-4/nfe" in metrics  # the evaluation is on the training's run
    assert experiment["tags"] and {t["key"]: t["value"] for t in experiment["tags"]}.get(
        "mlflow.experimentKind") == "custom_model_development"  # the UI opens on the training runs
    files = api(url, "GET", f"/api/2.0/mlflow/artifacts/list?run_id={run_id}")["files"]
    assert any(f["path"].startswith("samples-") and f["path"].endswith(".json") for f in files), files  # the table
    model = api(url, "GET", "/api/2.0/mlflow/registered-models/get?name=elf-owt")["registered_model"]
    assert "candidate" in {a["alias"] for a in model["aliases"]}
    candidate = next(a["version"] for a in model["aliases"] if a["alias"] == "candidate")
    version = api(url, "GET", f"/api/2.0/mlflow/model-versions/get?name=elf-owt&version={candidate}")
    assert version["model_version"]["source"].startswith("models:/m-")  # the run's pyfunc logged model
    assert version["model_version"]["run_id"] == run_id
    with urllib.request.urlopen(f"{url}/", timeout=10) as page:
        html = page.read().decode()
    assert page.status == 200 and "<html" in html.lower() and "mlflow" in html.lower()


@pytest.mark.slow
def test_pipeline_trains_datasets_concurrently_but_never_two_at_once_on_one_gpu_slot(stack):
    """`elf-pipeline` over owt and wmt14 submits both `train-elf` runs at once into one workspace: both
    finish, the second queued for the single `gpu` slot, the training intervals never overlap, and with
    `--push` the outputs reach the DVC remote."""
    project = copy_project(stack, "concurrent")
    remote = stack["root"] / "dvc-remote"
    sh(str(BIN / "dvc"), "remote", "add", "-d", "shared", str(remote), cwd=project)
    ledger = stack["root"] / "concurrent-gpu.jsonl"
    result = sh(sys.executable, "-m", "flows.pipeline", "--datasets", *DATASETS, "--no-evaluate", "--push",
                "--retries", "0", "--project-dir", str(project), cwd=REPO,
                env={**stack["env"], "ELF_GPU_LEDGER": str(ledger)})
    assert set(json.loads(result.stdout.strip().splitlines()[-1])) == set(DATASETS)
    holds = sorted((json.loads(line) for line in ledger.read_text().splitlines()), key=lambda h: h["acquired"])
    assert sorted(h["dataset"] for h in holds) == sorted(DATASETS) and {h["step"] for h in holds} == {"train"}
    first, second = holds
    assert first["released"] <= second["acquired"], holds
    assert second["asked"] < first["released"], "the second run never had to wait; the test proves nothing"
    assert first["flow_run_id"] != second["flow_run_id"]
    for name in DATASETS:
        assert (project / f"models/{name}/model/model.safetensors").is_file()
    status = sh(str(BIN / "dvc"), "status", *[f"train@{name}" for name in DATASETS], cwd=project, env=stack["env"])
    assert "up to date" in status.stdout, status.stdout
    # push: the models and everything they were built from are in the remote.
    cloud = sh(str(BIN / "dvc"), "status", "--cloud", "--with-deps", *[f"train@{name}" for name in DATASETS],
               cwd=project, env=stack["env"])
    assert "in sync" in cloud.stdout, cloud.stdout
    assert any(remote.rglob("*"))


@pytest.mark.slow
def test_training_holds_one_gpu_slot_per_process_and_refuses_more_than_the_limit(stack, tmp_path, monkeypatch):
    import flows.gpu as gpu

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["datasets"]["owt"]["nproc_per_node"] = 2
    params["train"]["datasets"]["wmt14"]["nproc_per_node"] = "auto"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    slots = [gpu.training_gpus(tmp_path, name) for name in ("owt", "wmt14", "xsum")]
    assert slots == [1, 1, 1]  # no GPU here: CPU processes share the machine like any step
    monkeypatch.setattr(gpu, "count_gpus", lambda: 8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5")
    assert [gpu.training_gpus(tmp_path, name) for name in ("owt", "wmt14", "xsum")] == [2, 3, 1]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu.training_gpus(tmp_path, "wmt14") == 8
    script = ("import logging\n"
              "from flows.gpu import ensure_gpu_limit, gpu_slot\n"
              "from flows.stages import PermanentStageError\n"
              "slots = ensure_gpu_limit()\n"
              "try:\n"
              "    with gpu_slot('owt', 'train', logging.getLogger(), slots=slots + 1):\n"
              "        print('ENTERED')\n"
              "except PermanentStageError as error:\n"
              "    print('REFUSED', error)\n")
    result = sh(sys.executable, "-c", script, cwd=REPO, env=stack["env"])
    assert "REFUSED error: train owt needs" in result.stdout and "ENTERED" not in result.stdout


def test_bad_parameter_fails_fast_with_the_stage_error_and_no_retry(stack):
    project = copy_project(stack, "bad-parameter")
    started = time.monotonic()
    result = sh(sys.executable, "-m", "flows.train_elf", "owt", "--params", "train.defaults.micro_batch_size=3",
                "--retries", "3", "--retry-delay", "0", "--no-evaluate", "--project-dir", str(project),
                cwd=REPO, env=stack["env"], check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert f"Failed: Flow run encountered an exception: PermanentStageError: {BAD_BATCH_ERROR}" in result.stderr
    assert output.count("> elf train owt") == 1, "a permanent failure must not be retried"
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_unreachable_servers_fail_fast_naming_their_url(stack):
    dead = f"http://127.0.0.1:{free_port()}"
    project = copy_project(stack, "unreachable")
    started = time.monotonic()
    no_prefect = sh(sys.executable, "-m", "flows.train_elf", "owt", "--project-dir", str(project), cwd=REPO,
                    env={**stack["env"], "PREFECT_API_URL": f"{dead}/api"}, check=False)
    assert no_prefect.returncode == 2
    assert f"error: Prefect server {dead}/api is not reachable" in no_prefect.stderr

    no_mlflow = sh(sys.executable, "-m", "flows.train_elf", "owt", "--project-dir", str(project), cwd=REPO,
                   env={**stack["env"], "MLFLOW_TRACKING_URI": dead}, check=False)
    assert no_mlflow.returncode == 1
    assert f"error: MLflow tracking server {dead} is not reachable" in no_mlflow.stderr
    assert "Running stage" not in no_mlflow.stdout + no_mlflow.stderr
    assert time.monotonic() - started < 40

    from elf.errors import ElfError
    from elf.tracking import mlflow_run

    os.environ["MLFLOW_TRACKING_URI"] = dead
    try:
        with pytest.raises(ElfError, match=f"MLflow tracking server {dead} is not reachable"):
            with mlflow_run("elf-test", "unreachable"):
                pass
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
