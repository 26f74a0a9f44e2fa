"""`train-elf`: train, sample and evaluate one dataset's model, with retries and GPU queueing.

    prefect deployment run train-elf/local --param dataset=owt                 # after `make orchestrate`
    prefect deployment run train-elf/local --param dataset=owt --param resume=false \\
        --param params='{"train.defaults.steps": 2000}'
    python -m flows.train_elf owt --params train.defaults.steps=2000           # in-process, no deployment

Every step is a `dvc repro` of the dataset's stages in the project directory (see flows/stages.py), so DVC
stays the only cache and `dvc.lock` stays true; Prefect adds what DVC lacks: retries that resume rather than
restart, a cluster-wide `gpu` queue (flows/gpu.py), remote execution and a UI. Prefect's own result
caching is off for every task: a second run of an up-to-date stage is skipped by DVC, not by Prefect.

Steps: the data stages up to `embed@<ds>` (no GPU slot), `train@<ds>` (one `gpu` slot per process; retried
transient failures resume from the newest checkpoint), then `sample@<ds>` and `evaluate@<ds>` (one `gpu`
slot), then, with `push`, `dvc push` of the outputs and the run cache for other machines.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

# A deployment loads this file by path; the repository root must be importable for `flows.*` and `elf`.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from flows.gpu import gpu_slot, training_gpus  # noqa: E402
from flows.mlflow_links import mlflow_run_link, preflight_tracking  # noqa: E402
from flows.stages import (  # noqa: E402
    apply_overrides,
    check_dataset,
    ensure_up_to_date,
    is_transient,
    repro,
    resolve_project,
    run_dvc,
)

DEFAULT_RETRIES = 2
DEFAULT_RETRY_DELAY_SECONDS = 10.0
STAGE_TASK_OPTIONS: dict[str, Any] = dict(cache_policy=NO_CACHE, persist_result=False,
                                          retry_condition_fn=is_transient)


@task(name="data", task_run_name="data {dataset}", **STAGE_TASK_OPTIONS)
def data_task(project: Path, dataset: str) -> None:
    """Everything `train@<ds>` reads (prepare, tokenizer, tokenize, encoder, embed) and the judge the evaluation
    reads (a small model trained once per dataset): no slot."""
    ensure_up_to_date([f"embed@{dataset}", f"judge@{dataset}"], project, get_run_logger())


@task(name="train", task_run_name="train {dataset}", **STAGE_TASK_OPTIONS)
def train_task(project: Path, dataset: str) -> None:
    """`train@<ds>` under one `gpu` slot per process (`train.*.nproc_per_node`: the stage launches torchrun).
    A retry reruns the same command, and the stage resumes from the newest checkpoint in
    models/<ds>/checkpoints (kept by `persist: true`)."""
    logger = get_run_logger()
    checkpoints = sorted(p.name for p in (project / "models" / dataset / "checkpoints").glob("step-*"))
    if checkpoints:
        logger.info("checkpoints present: %s (the stage resumes from the newest)", ", ".join(checkpoints))
    with gpu_slot(dataset, "train", logger, slots=training_gpus(project, dataset)):
        repro([f"train@{dataset}"], project, logger, single_item=True)


@task(name="evaluate", task_run_name="evaluate {dataset}", **STAGE_TASK_OPTIONS)
def evaluate_task(project: Path, dataset: str) -> None:
    """`sample@<ds>` and `evaluate@<ds>`: sampling runs the model on the GPU, so it takes a slot too."""
    logger = get_run_logger()
    with gpu_slot(dataset, "evaluate", logger):
        repro([f"sample@{dataset}", f"evaluate@{dataset}"], project, logger, single_item=True)


@task(name="push", task_run_name="push {dataset}", **STAGE_TASK_OPTIONS)
def push_task(project: Path, dataset: str, evaluate: bool) -> None:
    """Share the outputs through the DVC remote: the data and model of this dataset and the run cache.

    The run cache lets another clone restore these outputs with `dvc pull --run-cache && dvc repro`;
    dvc.lock, the record of what was built, is attached to the flow run as an artifact (a pod's
    workspace is gone when it ends; commit the lock from there to pin these outputs in git).
    """
    logger = get_run_logger()
    last = f"evaluate@{dataset}" if evaluate else f"train@{dataset}"
    run_dvc(["push", "--run-cache", "--with-deps", last], project, logger)
    lock = project / "dvc.lock"
    if lock.is_file():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key=artifact_key("dvc-lock", dataset), description=f"dvc.lock after {last}",
                                 markdown=f"```yaml\n{lock.read_text(encoding='utf-8')}\n```")


def artifact_key(prefix: str, dataset: str) -> str:
    """Prefect artifact keys allow only lowercase letters, digits and dashes."""
    return f"{prefix}-{re.sub(r'[^a-z0-9-]', '-', dataset.lower())}"


def report_mlflow_run(project: Path, dataset: str) -> dict[str, str] | None:
    """Log the MLflow run of this training and attach it to the flow run as a link artifact."""
    logger = get_run_logger()
    link = mlflow_run_link(project, dataset)
    if link is None:
        logger.warning("no models/%s/mlflow_run_id: the train stage did not record an MLflow run", dataset)
        return None
    logger.info("MLflow run %s in %s%s", link["run_id"], link["tracking_uri"],
                f" → {link['url']}" if "url" in link else "")
    if "url" in link:
        from prefect.artifacts import create_link_artifact

        create_link_artifact(key=artifact_key("mlflow-run", dataset), link=link["url"], link_text=f"MLflow: {dataset}",
                             description=f"training run {link['run_id']} ({link['tracking_uri']})")
    return link


def evaluation_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per sampler of `metrics/<ds>/eval.json`: each metric as "mean ± SE" over seeds, rounded for
    reading (the full-precision figures stay in the file and on the MLflow run)."""
    rows = []
    for sampler, metrics in report["samplers"].items():
        row: dict[str, Any] = {"sampler": sampler}
        for key, value in metrics.items():
            if key.endswith("_se") or "_se_" in key or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            se = metrics.get(f"{key}_se")
            row[key] = f"{value:.4g} ± {se:.2g}" if isinstance(se, int | float) and se else f"{value:.4g}"
        rows.append(row)
    return rows


def report_evaluation(project: Path, dataset: str, link: dict[str, str] | None) -> None:
    """Attach the evaluation to the flow run as a table artifact (the Prefect UI shows no metrics otherwise)."""
    path = project / "metrics" / dataset / "eval.json"
    if not path.is_file():
        return
    from prefect.artifacts import create_table_artifact

    report = json.loads(path.read_text(encoding="utf-8"))
    primary = report["primary"]
    value = f"{primary['value']:.4g}" if isinstance(primary["value"], int | float) else "none (no sample scored)"
    where = f"; MLflow run: [{link['run_id']}]({link['url']})" if link and "url" in link else ""
    create_table_artifact(key=artifact_key("evaluation", dataset), table=evaluation_table(report),
                          description=f"{dataset}: {primary['metric']} = {value} ({primary['sampler']}, the "
                                      f"registry's primary){where}")


def set_checkpoints_aside(project: Path, dataset: str) -> Path | None:
    """`resume=False`: move the checkpoints aside (never delete training state) so the train stage starts from
    step 0; returns where they went (`models/<ds>.aside/fresh-start-<time>/`), or None when there were none.

    DVC then sees `models/<ds>` changed and reruns the stage even when nothing else did.
    """
    from elf.checkpoint import move_aside

    checkpoints = project / "models" / dataset / "checkpoints"
    found = sorted(checkpoints.iterdir()) if checkpoints.is_dir() else []
    if not found:
        return None
    return move_aside(found, checkpoints.parent, f"fresh-start-{time.strftime('%Y%m%d-%H%M%S')}")


@flow(name="train-elf", persist_result=False, log_prints=True)
def train_elf(dataset: str, params: dict[str, Any] | None = None, resume: bool = True, evaluate: bool = True,
              push: bool = False, retries: int = DEFAULT_RETRIES,
              retry_delay_seconds: float = DEFAULT_RETRY_DELAY_SECONDS, project_dir: str | None = None) -> dict:
    """Train (or resume) one dataset's ELF model, then sample and evaluate it, all through `dvc repro`.

    Args:
        dataset: a key of `datasets:` in params.yaml (owt, wmt14, xsum by default).
        params: overrides as {"dotted.key": value}, written into params.yaml like `dvc exp run -S`.
        resume: False moves models/<dataset>/checkpoints aside first (to models/<dataset>.aside/), so
            training starts from scratch; nothing is deleted.
        evaluate: also run sample@<dataset> and evaluate@<dataset>.
        push: `dvc push` the outputs and run cache at the end (cluster runs).
        retries, retry_delay_seconds: per step, for transient failures only.
        project_dir: the repository root; default the working directory (set by the deployment).
    """
    logger = get_run_logger()
    project = resolve_project(project_dir)
    if params:
        changed = apply_overrides(project, params)
        logger.info("params.yaml overrides: %s", ", ".join(changed) if changed else "none (values already set)")
    check_dataset(project, dataset)
    preflight_tracking()
    if not resume and (aside := set_checkpoints_aside(project, dataset)):
        logger.info("resume=False: moved the checkpoints of models/%s to %s; training starts from step 0", dataset,
                    aside)
    policy = dict(retries=retries, retry_delay_seconds=retry_delay_seconds)
    data_task.with_options(**policy)(project, dataset)
    train_task.with_options(**policy)(project, dataset)
    link = report_mlflow_run(project, dataset)
    if evaluate:
        evaluate_task.with_options(**policy)(project, dataset)
        report_evaluation(project, dataset, link)
    if push:
        push_task.with_options(**policy)(project, dataset, evaluate)
    summary: dict[str, Any] = {"dataset": dataset, "project": str(project), "mlflow": link}
    for name in ("train", "eval"):
        path = project / "metrics" / dataset / f"{name}.json"
        if path.is_file():
            summary[name] = json.loads(path.read_text(encoding="utf-8"))
    return summary


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs as `dvc exp run -S` takes them; values are parsed as YAML (numbers, lists, ...)."""
    from elf.config import parse_yaml

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --params expects key=value, got '{pair}'")
        overrides[key] = parse_yaml(value, f"--params {key}")  # YAML 1.2, as `dvc exp run -S` parses it
    return overrides


def main(argv: list[str] | None = None) -> int:
    """Run the flow in this process (no deployment or worker needed; a Prefect server still records it)."""
    from flows.setup import check_prefect_api

    parser = argparse.ArgumentParser(prog="python -m flows.train_elf", description=train_elf.description)
    parser.add_argument("dataset")
    parser.add_argument("--params", nargs="*", default=[], metavar="KEY=VALUE", help="params.yaml overrides")
    parser.add_argument("--no-resume", action="store_true", help="move checkpoints aside, train from scratch")
    parser.add_argument("--no-evaluate", action="store_true", help="stop after training")
    parser.add_argument("--push", action="store_true", help="dvc push outputs and run cache at the end")
    parser.add_argument("--retries", type=int, default=DEFAULT_RETRIES)
    parser.add_argument("--retry-delay", type=float, default=DEFAULT_RETRY_DELAY_SECONDS)
    parser.add_argument("--project-dir", default=None)
    args = parser.parse_args(argv)
    error = check_prefect_api()
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    state = train_elf(args.dataset, params=parse_overrides(args.params) or None, resume=not args.no_resume,
                      evaluate=not args.no_evaluate, push=args.push, retries=args.retries,
                      retry_delay_seconds=args.retry_delay, project_dir=args.project_dir, return_state=True)
    if state.is_completed():
        print(json.dumps(state.result(), default=str))
        return 0
    print(f"{state.name}: {state.message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
