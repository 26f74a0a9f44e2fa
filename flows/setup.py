"""One command from a checkout to `prefect deployment run train-elf/local --param dataset=owt`.

    python -m flows.setup local     # (make orchestrate) server, work pool, `gpu` limit, deployments, worker
    python -m flows.setup status    # what is running
    python -m flows.setup stop      # stop the worker and the background server started here
    python -m flows.setup cluster --gpus 8    # against a shared server: kubernetes pool, limit, deployment
    python -m flows.setup k8s-template        # print the kubernetes base job template with GPU variables

`local` is idempotent: each step checks first and only does what is missing, so rerunning it after a
reboot brings back the server and the worker and changes nothing else. It uses the server at
PREFECT_API_URL when that is set (a team's server), else starts one on 127.0.0.1 in the background and
records its URL in the active Prefect profile, so that later `prefect ...` commands in any shell reach it.
The process ids and logs of the server and worker it starts live in `.prefect/` in the repository
(git-ignored); `stop` ends exactly those.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STATE_DIR = ROOT / ".prefect"
PROFILE_MARK = STATE_DIR / "profile-api-url"  # the PREFECT_API_URL `local` saved in the profile
LOCAL_POOL = "elf-local"
CLUSTER_POOL = "elf-k8s"
DEFAULT_PORT = 4200
LOCAL_DEPLOYMENTS = ("train-elf/local", "elf-pipeline/local")
CLUSTER_DEPLOYMENTS = ("train-elf/cluster",)
CLUSTER_ENV = ("ELF_IMAGE", "ELF_GIT_REPOSITORY", "MLFLOW_TRACKING_URI")
# How long a run denied a `gpu` slot waits before asking again is about min(average hold, this) seconds,
# decided by the server (default 30): a local server is started with 2, so a queued run starts within a few
# seconds of a slot freeing, for one small request per waiting run every ~2 s.
SLOT_WAIT_ENV = "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS"
QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1",
             "MLFLOW_DISABLE_TELEMETRY": "true"}


class SetupError(RuntimeError):
    """A step that cannot continue; the message says what to do."""


def _say(message: str) -> None:
    print(f"[orchestrate] {message}", flush=True)


# -- the Prefect API --------------------------------------------------------------------------------------------


def configured_api_url() -> str | None:
    """PREFECT_API_URL from the environment or the active profile (None: Prefect's temporary server)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def api_healthy(url: str, timeout: float = 3.0) -> tuple[bool, str]:
    """(reachable, reason). Any HTTP answer means a server is there (Prefect Cloud answers 401 here)."""
    try:
        urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return True, ""
    except (OSError, ValueError) as error:
        return False, str(getattr(error, "reason", None) or error)
    return True, ""


def check_prefect_api() -> str | None:
    """A one-line error when PREFECT_API_URL points at a server that does not answer, else None.

    Prefect's own clients report an unreachable server as a connection traceback (or keep retrying);
    checking first names the URL and the fix.
    """
    url = configured_api_url()
    if url is None:
        return None
    ok, reason = api_healthy(url)
    if ok:
        return None
    return (f"Prefect server {url} is not reachable ({reason}); start it with `make orchestrate`, "
            "or point PREFECT_API_URL at a running server")


def _is_local(url: str) -> bool:
    return urllib.parse.urlparse(url).hostname in ("127.0.0.1", "localhost")


def _child_env(api_url: str, **extra: str) -> dict[str, str]:
    """Environment for the prefect CLI, the server and the worker: the worker's flow runs must find this
    project's `dvc` and `elf` (see `flows.stages.tool_env`)."""
    from flows.stages import tool_env

    return {**tool_env(), **QUIET_ENV, **extra, "PREFECT_API_URL": api_url}


def _prefect(args: list[str], api_url: str, check: bool = True,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=_child_env(api_url, **(env or {})),
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        tail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-15:]
        raise SetupError(f"`prefect {' '.join(args)}` failed:\n" + "\n".join(tail))
    return result


def save_api_url_in_profile(url: str) -> None:
    """Make later `prefect ...` commands in any shell reach the server `local` starts; `stop` takes it back."""
    from prefect.settings import PREFECT_API_URL, update_current_profile

    update_current_profile({PREFECT_API_URL: url})
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    PROFILE_MARK.write_text(f"{url}\n")
    _say(f"PREFECT_API_URL={url} saved in the active Prefect profile")


def ensure_server(port: int, wait_s: float = 180.0) -> str:
    """The API URL of a healthy server, starting a local background one when none is configured."""
    url = configured_api_url()
    if url is None:
        url = f"http://127.0.0.1:{port}/api"
        save_api_url_in_profile(url)
    ok, reason = api_healthy(url)
    if ok:
        _say(f"Prefect server {url} is up")
        return url
    if not _is_local(url):
        raise SetupError(f"Prefect server {url} is not reachable ({reason}); check PREFECT_API_URL")
    parsed = urllib.parse.urlparse(url)
    if not (pid := _pid_alive(STATE_DIR / "server.pid")):
        pid = _detach(["server", "start", "--host", parsed.hostname, "--port", str(parsed.port or port)], "server",
                      _child_env(url, **{SLOT_WAIT_ENV: os.environ.get(SLOT_WAIT_ENV, "2")}))
        _say(f"starting a Prefect server on {parsed.hostname}:{parsed.port} (pid {pid}, log .prefect/server.log)")
    deadline = time.monotonic() + wait_s
    while not api_healthy(url)[0]:
        if time.monotonic() > deadline or not _pid_alive(STATE_DIR / "server.pid"):
            raise SetupError(f"Prefect server {url} did not become healthy within {wait_s:.0f} s "
                             "(see .prefect/server.log; raise the wait on a loaded machine)")
        time.sleep(0.5)
    _say(f"Prefect server {url} is up")
    return url


def _detach(prefect_args: list[str], name: str, env: dict[str, str]) -> int:
    """Start `prefect <args>` in its own session, logging to .prefect/<name>.log; record its pid.

    Not `prefect server start --background`: that leaves the server writing to a pipe nobody reads once
    the starting command exits, and the server dies the first time it logs a line.
    """
    STATE_DIR.mkdir(exist_ok=True)
    with open(STATE_DIR / f"{name}.log", "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "prefect", *prefect_args], cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    (STATE_DIR / f"{name}.pid").write_text(f"{process.pid}\n")
    return process.pid


# -- pools, the gpu limit, deployments ----------------------------------------------------------------------------


def default_job_template(pool_type: str) -> dict[str, Any]:
    """Prefect's default base job template for a worker type: from the installed worker class, else from the
    metadata bundled with Prefect (what a server offers offline), else as the API serves it. The first two
    need no server, and no `prefect-kubernetes` install on the machine that creates the pool."""
    import prefect.server.api
    from prefect.workers.base import BaseWorker

    if worker_class := BaseWorker.get_worker_class_from_type(pool_type):  # installed workers (process, ...)
        return worker_class.get_default_base_job_template()
    bundled = Path(prefect.server.api.__file__).parent / "collections_data/views/aggregate-worker-metadata.json"
    if bundled.is_file():
        for collection in json.loads(bundled.read_text(encoding="utf-8")).values():
            for worker in collection.values():
                if worker.get("type") == pool_type and worker.get("default_base_job_configuration"):
                    return worker["default_base_job_configuration"]
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    template = asyncio.run(get_default_base_job_template_for_infrastructure_type(pool_type))
    if not template:
        raise SetupError(f"this Prefect installation knows no '{pool_type}' worker template")
    return template


def gpu_job_template() -> dict[str, Any]:
    """Prefect's kubernetes base job template plus GPU variables: `gpu_count` (nvidia.com/gpu requests and
    limits), `node_selector` and `tolerations`, settable per deployment in `job_variables`."""
    template = default_job_template("kubernetes")
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    resources = pod["containers"][0].setdefault("resources", {})
    resources.setdefault("limits", {})["nvidia.com/gpu"] = "{{ gpu_count }}"
    resources.setdefault("requests", {})["nvidia.com/gpu"] = "{{ gpu_count }}"
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    properties = template["variables"]["properties"]
    properties["gpu_count"] = {"title": "GPUs", "type": "integer", "default": 1, "minimum": 0,
                               "description": "nvidia.com/gpu requested (and limited) per flow-run pod."}
    properties["node_selector"] = {"title": "Node selector", "type": "object", "default": {},
                                   "additionalProperties": {"type": "string"},
                                   "description": "Labels a node must have, e.g. a GPU product label."}
    properties["tolerations"] = {"title": "Tolerations", "type": "array", "items": {"type": "object"},
                                 "default": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                              "effect": "NoSchedule"}],
                                 "description": "Tolerations for tainted GPU nodes."}
    return template


def ensure_pool(name: str, pool_type: str, template: dict[str, Any] | None = None) -> None:
    """Create the work pool when missing; with `template`, keep the pool's template equal to it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            base = template or default_job_template(pool_type)
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=base))
            _say(f"created {pool_type} work pool '{name}'")
            return
        if pool.type != pool_type:
            raise SetupError(f"work pool '{name}' exists with type {pool.type}, expected {pool_type}")
        if template is not None and pool.base_job_template != template:
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
            _say(f"updated the base job template of work pool '{name}'")
        else:
            _say(f"work pool '{name}' ({pool_type}) exists")


def deploy(names: tuple[str, ...], api_url: str) -> None:
    """`prefect --no-prompt deploy` of the named deployments in prefect.yaml (an upsert: safe to repeat)."""
    args = ["--no-prompt", "deploy"]
    for name in names:
        args += ["--name", name]
    _prefect(args, api_url)
    _say(f"deployed {', '.join(names)}")


# -- the local worker --------------------------------------------------------------------------------------------


def _pid_alive(pid_file: Path) -> int | None:
    """The pid recorded in `pid_file` if that process still runs and is the `prefect ...` started here.

    The command line is checked so that a stale file whose pid was reused never leads to stopping an
    unrelated process.
    """
    import psutil

    try:
        pid = int(pid_file.read_text().strip())
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        command = " ".join(process.cmdline())
    except (OSError, ValueError, psutil.Error):
        return None
    return pid if "prefect" in command and pid_file.stem in command else None


def ensure_worker(api_url: str, pool: str, query_seconds: float) -> None:
    """A process worker for `pool`, detached, logging to .prefect/worker.log; reused when alive.

    It polls every `query_seconds` (Prefect's default, 10 s, would add up to 10 s before each local run).
    """
    if pid := _pid_alive(STATE_DIR / "worker.pid"):
        _say(f"worker for '{pool}' is running (pid {pid})")
        return
    env = _child_env(api_url, PREFECT_WORKER_QUERY_SECONDS=str(query_seconds),
                     PREFECT_RUNNER_POLL_FREQUENCY=str(max(1, int(query_seconds))))
    pid = _detach(["worker", "start", "--pool", pool, "--type", "process"], "worker", env)
    _say(f"started a worker for '{pool}' (pid {pid}, log .prefect/worker.log)")


def stop_process(name: str) -> None:
    """Stop a process `_detach` started (its whole session); a worker stopping ends the flow runs it started."""
    pid_file = STATE_DIR / f"{name}.pid"
    if pid := _pid_alive(pid_file):
        os.killpg(pid, signal.SIGTERM)
        for _ in range(100):
            if not _pid_alive(pid_file):
                break
            time.sleep(0.1)
        _say(f"stopped the {name} (pid {pid})")
    pid_file.unlink(missing_ok=True)


# -- commands ------------------------------------------------------------------------------------------------------


def setup_local(port: int, slots: int | None, query_seconds: float) -> str:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.gpu import ensure_gpu_limit

    api_url = ensure_server(port)
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        ensure_pool(LOCAL_POOL, "process")
        limit = ensure_gpu_limit(slots, update=slots is not None)
        _say(f"global concurrency limit 'gpu': {limit} slot(s)")
    deploy(LOCAL_DEPLOYMENTS, api_url)
    ensure_worker(api_url, LOCAL_POOL, query_seconds)
    _say("ready: prefect deployment run train-elf/local --param dataset=owt")
    return api_url


def setup_cluster(slots: int, pool: str) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.gpu import ensure_gpu_limit

    api_url = configured_api_url()
    if api_url is None:
        raise SetupError("set PREFECT_API_URL to the shared Prefect server first")
    if error := check_prefect_api():
        raise SetupError(error)
    missing = [name for name in CLUSTER_ENV if not os.environ.get(name)]
    if missing:
        raise SetupError(f"set {', '.join(missing)} (prefect.yaml reads them when deploying train-elf/cluster)")
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        ensure_pool(pool, "kubernetes", gpu_job_template())
        _say(f"global concurrency limit 'gpu': {ensure_gpu_limit(slots, update=True)} slot(s)")
    deploy(CLUSTER_DEPLOYMENTS, api_url)
    _say(f"start a worker in the cluster: prefect worker start --pool {pool} --type kubernetes "
         "(needs `pip install prefect-kubernetes`)")


def status() -> int:
    url = configured_api_url()
    ok, reason = api_healthy(url) if url else (False, "PREFECT_API_URL is not set")
    print(json.dumps({"api_url": url, "server": "up" if ok else f"down ({reason})",
                      "server_pid": _pid_alive(STATE_DIR / "server.pid"),
                      "worker_pid": _pid_alive(STATE_DIR / "worker.pid")}))
    return 0 if ok else 1


def stop() -> None:
    """Stop the worker, then the server if `local` started it (a server it found running is left alone), and
    take back the PREFECT_API_URL that `local` put in the active profile (later `prefect` commands would
    otherwise try the stopped server instead of starting their own)."""
    from prefect.settings import PREFECT_API_URL, load_current_profile, update_current_profile

    stop_process("worker")
    stop_process("server")
    if PROFILE_MARK.is_file():
        ours = PROFILE_MARK.read_text().strip()
        if load_current_profile().settings.get(PREFECT_API_URL) == ours:  # unless someone changed it since
            update_current_profile({PREFECT_API_URL: None})
            _say(f"PREFECT_API_URL={ours} removed from the active Prefect profile")
        PROFILE_MARK.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.setup", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    local = commands.add_parser("local", help="local server, process pool, gpu limit, deployments, worker")
    local.add_argument("--port", type=int, default=DEFAULT_PORT)
    local.add_argument("--gpus", type=int, default=None, help="slots of the gpu limit (default: GPUs seen, ≥ 1)")
    local.add_argument("--query-seconds", type=float, default=1.0, help="worker poll interval (s)")
    cluster = commands.add_parser("cluster", help="kubernetes pool with GPU job variables, limit, deployment")
    cluster.add_argument("--gpus", type=int, required=True, help="GPUs the cluster may use at once")
    cluster.add_argument("--pool", default=CLUSTER_POOL)
    commands.add_parser("status", help="server and worker state")
    commands.add_parser("stop", help="stop the worker and the local background server")
    commands.add_parser("k8s-template", help="print the kubernetes base job template with GPU variables")
    args = parser.parse_args(argv)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    try:
        if args.command == "local":
            setup_local(args.port, args.gpus, args.query_seconds)
        elif args.command == "cluster":
            setup_cluster(args.gpus, args.pool)
        elif args.command == "status":
            return status()
        elif args.command == "stop":
            stop()
        else:
            print(json.dumps(gpu_job_template(), indent=2))
    except SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
