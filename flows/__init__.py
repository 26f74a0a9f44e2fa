"""Prefect 3 flows over the DVC pipeline: retries, GPU queueing and remote execution.

- `train-elf` (flows/train_elf.py): one dataset — data stages, training under a `gpu` slot, sampling and
  evaluation — each step a `dvc repro` of that dataset's stages.
- `elf-pipeline` (flows/pipeline.py): every dataset, concurrently where `gpu` slots allow.
- flows/setup.py: `make orchestrate` — a local server, the `elf-local` process pool, the `gpu` limit,
  the deployments of prefect.yaml and a worker; `cluster` does the same for a kubernetes pool.

DVC decides what runs and caches it, MLflow records it; Prefect only schedules, retries and queues, so
its result caching is off and every stage also runs without it (`dvc repro`, or `elf <stage>`).
"""
