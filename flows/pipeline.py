"""`elf-pipeline`: every dataset end to end, datasets side by side where GPU slots allow.

    prefect deployment run elf-pipeline/local
    python -m flows.pipeline --datasets owt wmt14

The data stages shared by all datasets (tokenizer, encoder) run once first, in one `dvc repro`, so that
the per-dataset runs that follow never race to build them. Then one `train-elf` subflow per dataset is
submitted at once: their CPU steps overlap freely and the `gpu` limit lets as many train or sample
steps run together as it has slots (one slot: the trainings queue, one after the other).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

_ROOT = str(Path(__file__).resolve().parents[1])  # loaded by path as a deployment entrypoint
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from flows.mlflow_links import preflight_tracking  # noqa: E402
from flows.stages import (  # noqa: E402
    PermanentStageError,
    StageFailed,
    apply_overrides,
    check_dataset,
    dataset_names,
    ensure_up_to_date,
    is_transient,
    resolve_project,
)
from flows.train_elf import DEFAULT_RETRIES, DEFAULT_RETRY_DELAY_SECONDS, train_elf  # noqa: E402


@task(name="shared data", cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=is_transient)
def shared_data_task(project: Path, datasets: list[str]) -> None:
    """All data stages (and judges) of the chosen datasets in one DVC process (DVC runs them in dependency
    order), so that the datasets' own flows find them up to date and never walk the shared stages at once."""
    ensure_up_to_date([f"{stage}@{name}" for name in datasets for stage in ("embed", "judge")], project,
                      get_run_logger())


@task(name="dataset", task_run_name="dataset {dataset}", cache_policy=NO_CACHE, persist_result=False)
def dataset_task(dataset: str, options: dict[str, Any]) -> dict:
    """One dataset's `train-elf` as a subflow; a task, so that datasets can be submitted side by side."""
    return train_elf(dataset, **options)


@flow(name="elf-pipeline", persist_result=False)
def elf_pipeline(datasets: list[str] | None = None, params: dict[str, Any] | None = None, resume: bool = True,
                 evaluate: bool = True, push: bool = False, retries: int = DEFAULT_RETRIES,
                 retry_delay_seconds: float = DEFAULT_RETRY_DELAY_SECONDS, project_dir: str | None = None) -> dict:
    """Run `train-elf` for every dataset (default: all of params.yaml) concurrently.

    `params` overrides are applied once, before anything runs; the other arguments are `train-elf`'s.
    """
    logger = get_run_logger()
    project = resolve_project(project_dir)
    if params:
        changed = apply_overrides(project, params)
        logger.info("params.yaml overrides: %s", ", ".join(changed) if changed else "none (values already set)")
    chosen = list(datasets) if datasets else dataset_names(project)
    for name in chosen:
        check_dataset(project, name)
    preflight_tracking()
    shared_data_task.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)(project, chosen)
    options = dict(resume=resume, evaluate=evaluate, push=push, retries=retries,
                   retry_delay_seconds=retry_delay_seconds, project_dir=str(project))
    futures = {name: dataset_task.submit(name, options) for name in chosen}
    results, failed = {}, []
    for name, future in futures.items():
        future.wait()
        if future.state.is_completed():
            results[name] = future.result()
        else:
            failed.append(f"{name}: {future.state.message}")
    if failed:
        permanent = all("PermanentStageError" in line for line in failed)
        error = PermanentStageError if permanent else StageFailed
        raise error("; ".join(failed))
    return results


def main(argv: list[str] | None = None) -> int:
    from flows.setup import check_prefect_api

    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=elf_pipeline.description)
    parser.add_argument("--datasets", nargs="*", default=None)
    parser.add_argument("--no-evaluate", action="store_true")
    parser.add_argument("--push", action="store_true", help="dvc push outputs and run cache at the end")
    parser.add_argument("--retries", type=int, default=DEFAULT_RETRIES)
    parser.add_argument("--retry-delay", type=float, default=DEFAULT_RETRY_DELAY_SECONDS)
    parser.add_argument("--project-dir", default=None)
    args = parser.parse_args(argv)
    if error := check_prefect_api():
        print(f"error: {error}", file=sys.stderr)
        return 2
    state = elf_pipeline(datasets=args.datasets, evaluate=not args.no_evaluate, push=args.push, retries=args.retries,
                         retry_delay_seconds=args.retry_delay, project_dir=args.project_dir, return_state=True)
    if state.is_completed():
        print(json.dumps(state.result(), default=str))
        return 0
    print(f"{state.name}: {state.message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
