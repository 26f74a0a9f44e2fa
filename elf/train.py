"""The train stage: one ELF model per dataset, single process or `torchrun` DDP, resumable exactly.

    elf train owt                                                 # one process, or torchrun when
                                                                  # train.*.nproc_per_node is > 1 / auto
    torchrun --standalone --nproc-per-node 8 -m elf.cli train owt  # the same by hand: DDP on 8 GPUs (gloo on CPU)

The step itself (noise, loss, backward, clip, optimiser, EMA) is elf/step.py; this module holds the loop,
checkpoints, resume, logging and the final model.

The global batch (`train.*.batch_size`) is the same whatever the number of processes: each process takes
its contiguous slice of every global batch and splits it into micro-batches (gradient accumulation). The
random draws of the objective are seeded per (step, row of the global batch), and the loss is normalised
by the global number of loss tokens, so 1 process and N processes compute the same update.

Outputs under `models/<ds>/`: `checkpoints/step-XXXXXX/` (see elf/checkpoint.py; kept across `dvc repro`
runs with `persist: true`, and resumed automatically) and `model/` — the final EMA network as
`config.json` + `model.safetensors`, loadable with `elf.model.load_model`. Also `metrics/<ds>/train.json`
and the loss curve `metrics/<ds>/train_loss.png`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from elf import checkpoint as ckpt
from elf.config import DatasetConfig, TrainSettings
from elf.data.loader import TrainLoader
from elf.data.shards import read_json, read_manifest, write_json_atomic
from elf.data.tokens import FORMAT as TOKENS_FORMAT
from elf.distributed import Dist, barrier, init_distributed, shutdown
from elf.encoders import load_encoder
from elf.errors import ElfError
from elf.flow import ObjectiveConfig
from elf.hashing import file_sha256
from elf.model import ELF, build_model, num_parameters, save_model
from elf.optim import EMA, build_optimizer, warmup_constant_schedule
from elf.runtime import configure_device
from elf.step import TrainStep, micro_batches


@dataclass(frozen=True)
class TrainPaths:
    tokens: Path  # data/tokens/<ds>/train
    embeddings: Path | None  # data/embeddings/<ds>/train when cached, else None (online encoding)
    encoder: Path  # data/encoder
    out: Path  # models/<ds>
    metrics: Path  # metrics/<ds>

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    @property
    def model(self) -> Path:
        return self.out / "model"


RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "nproc_per_node", "compile")


def run_fingerprint(dataset: DatasetConfig, settings: TrainSettings, seed: int, paths: TrainPaths) -> str:
    """What a checkpoint must agree with to be resumed: everything but the settings that may change midway."""
    import hashlib

    record = {"dataset": dataset.model_dump(mode="json"), "seed": seed,
              "train": settings.model_dump(mode="json", exclude=set(RESUMABLE_CHANGES)),
              "tokens": file_sha256(paths.tokens / "manifest.json"),
              "encoder": read_json(paths.encoder / "encoder.json", "encoder record")["content_hash"]}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


class Trainer:
    """Holds everything a step needs, and everything a checkpoint must restore."""

    def __init__(self, name: str, dataset: DatasetConfig, settings: TrainSettings, seed: int, paths: TrainPaths,
                 d: Dist):
        self.name, self.dataset, self.settings, self.seed, self.paths, self.d = name, dataset, settings, seed, paths, d
        tokens_manifest = read_manifest(paths.tokens, TOKENS_FORMAT)
        self.encoder = load_encoder(paths.encoder, expected_tokenizer_hash=tokens_manifest["tokenizer_hash"]).to(
            d.device)
        self.tokens_manifest = tokens_manifest
        self.local_batch, self.micro = micro_batches(settings.batch_size, settings.micro_batch_size, d.world)
        torch.manual_seed(seed)  # identical initial weights on every rank
        self.model: ELF = build_model(settings.preset, self.encoder.dim, tokens_manifest["vocab_size"],
                                      **settings.model.overrides()).to(d.device)
        self.optimizer = build_optimizer(self.model, kind=settings.optimizer, lr=settings.learning_rate)
        self.scheduler = warmup_constant_schedule(self.optimizer, settings.warmup_steps)
        self.ema = EMA(self.model, settings.ema_decay)
        self.objective = ObjectiveConfig(**settings.objective.model_dump())
        compile_model = settings.compile is True or (settings.compile == "auto" and d.device.type == "cuda")
        self.train_step_fn = TrainStep(self.model, self.optimizer, self.scheduler, self.ema, self.objective,
                                       seed=seed, d=d, local_batch=self.local_batch, micro_batch=self.micro,
                                       grad_clip=settings.grad_clip, compile=compile_model)
        # The global stream, sliced per process (see elf/data/loader.py): world-size-invariant batches.
        self.loader = TrainLoader(
            paths.tokens, paths.embeddings, self.encoder, batch_size=settings.batch_size, seed=seed,
            shuffle_window=settings.shuffle_window,
            condition_dropout=settings.objective.condition_dropout if dataset.task == "seq2seq" else 0.0,
            device=d.device, rows=(d.rank * self.local_batch, (d.rank + 1) * self.local_batch),
            encoder_hash=read_json(paths.encoder / "encoder.json", "encoder record")["content_hash"],
        )
        self.fingerprint = run_fingerprint(dataset, settings, seed, paths)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.mlflow_run_id: str | None = None
        torch.manual_seed(seed + 1 + d.rank)  # per-rank stream for anything else random

    # -- one optimisation step ------------------------------------------------------------------------------

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimisation step (elf/step.py); its statistics stay on the device until read."""
        stats = self.train_step_fn(next(self.loader), self.step)
        self.step += 1
        return stats

    # -- checkpoints ----------------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        root = self.paths.checkpoints
        tmp = ckpt.tmp_dir(root, self.step)
        if self.d.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.d)
        ckpt.save_tensors(tmp / f"rank-{self.d.rank}-rng.safetensors", ckpt.rng_state())
        ckpt.write_json(tmp / f"rank-{self.d.rank}.json", {"loader": self.loader.state_dict()})
        if self.d.main:
            ckpt.save_tensors(tmp / "model.safetensors", self.model.state_dict())
            ema = self.ema.state_dict()
            ckpt.save_tensors(tmp / "ema.safetensors", ema["shadow"])
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            ckpt.write_json(tmp / "trainer.json", {
                "step": self.step, "world_size": self.d.world, "scheduler": self.scheduler.state_dict(),
                "ema": {"decay": ema["decay"], "num_updates": ema["num_updates"]}, "history": self.history,
                "mlflow_run_id": self.mlflow_run_id, "fingerprint": self.fingerprint,
            })
        barrier(self.d)
        if self.d.main:
            ckpt.finalise(root, self.step, self.settings.keep_checkpoints)
        barrier(self.d)

    def resume(self) -> bool:
        """Restore the newest checkpoint, if any. A corrupt one is an error, not a fresh start."""
        if self.d.main:
            ckpt.clean_partial(self.paths.checkpoints)
        barrier(self.d)
        found = ckpt.list_checkpoints(self.paths.checkpoints)
        past = [c for c in found if ckpt.checkpoint_step(c) > self.settings.steps]
        if past:
            # train.steps was lowered below what was trained: those checkpoints would finish the run at the
            # wrong step. Resume from an earlier one if kept, else from scratch.
            barrier(self.d)
            if self.d.main:
                print(f"train {self.name}: train.steps is {self.settings.steps}; removing "
                      f"{len(past)} checkpoint(s) past it in {self.paths.checkpoints}", file=sys.stderr)
                for directory in past:
                    shutil.rmtree(directory)
            barrier(self.d)
            found = found[: len(found) - len(past)]
        if not found:
            return False
        directory = found[-1]
        ckpt.verify(directory)
        state = ckpt.read_trainer_state(directory)
        if state.get("fingerprint") != self.fingerprint:
            # Not corruption: the inputs or settings changed (e.g. `dvc repro` after a params edit), so these
            # checkpoints belong to another run. Say so, and start that run from scratch.
            barrier(self.d)
            if self.d.main:
                print(f"train {self.name}: {self.paths.checkpoints} holds checkpoints of other data, encoder or "
                      f"settings (only {', '.join(RESUMABLE_CHANGES)} may change and still resume): "
                      "removing them and training from scratch", file=sys.stderr)
                shutil.rmtree(self.paths.checkpoints)
            barrier(self.d)
            return False
        try:
            self.model.load_state_dict(ckpt.load_tensors(directory / "model.safetensors"))
            self.ema.load_state_dict({**state["ema"], "shadow": ckpt.load_tensors(directory / "ema.safetensors")})
            self.optimizer.load_state_dict(ckpt.load_optimizer_state(directory / "optimizer.pt"))
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise ElfError(f"{directory}: checkpoint does not fit this model/optimiser "
                           f"({str(error).splitlines()[0]}); did params.yaml change?") from None
        # The loader state is global (every process follows the same stream), so any rank's copy will do and
        # the number of processes may change between runs; RNG states are restored where the rank existed.
        rank_file = directory / f"rank-{self.d.rank}.json"
        rank_state = read_json(rank_file if rank_file.exists() else directory / "rank-0.json", "rank state")
        self.loader.load_state_dict(rank_state["loader"])
        if (directory / f"rank-{self.d.rank}-rng.safetensors").exists():
            ckpt.set_rng_state(ckpt.load_tensors(directory / f"rank-{self.d.rank}-rng.safetensors"))
        self.step = state["step"]
        self.history = state["history"]
        self.mlflow_run_id = state["mlflow_run_id"]
        return True


def _plot_loss(history: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [h["step"] for h in history]
    axes[0].plot(steps, [h["loss"] for h in history], label="loss")
    axes[0].plot(steps, [h["mse"] for h in history], label="mse (denoise)", alpha=0.7)
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[1].plot(steps, [h["ce"] for h in history], label="ce (decode)")
    axes[1].plot(steps, [h["decode_acc"] for h in history], label="decode accuracy")
    axes[1].legend()
    for ax in axes:
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _mlflow_context(trainer: Trainer, params: dict[str, Any]):
    from elf.tracking import mlflow_run

    if not trainer.d.main:
        return contextlib.nullcontext(None)
    paths = trainer.paths
    tags = {"dataset": trainer.name, "tokens_manifest_sha256": file_sha256(paths.tokens / "manifest.json"),
            "encoder_content_hash": read_json(paths.encoder / "encoder.json", "encoder record")["content_hash"]}
    if paths.embeddings is not None:
        tags["embeddings_manifest_sha256"] = file_sha256(paths.embeddings / "manifest.json")
    return mlflow_run(f"elf-{trainer.name}", f"train-{trainer.name}", params=None if trainer.mlflow_run_id else params,
                      tags=tags, run_id=trainer.mlflow_run_id, system_metrics=True)


def train(name: str, dataset: DatasetConfig, settings: TrainSettings, seed: int, paths: TrainPaths,
          stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) to `settings.steps`; `stop_after` ends early after that many steps of this call
    (for tests of resume). Returns the final metrics (rank 0)."""
    d = init_distributed()
    configure_device(d.device)
    try:
        return _train(name, dataset, settings, seed, paths, stop_after, d)
    finally:
        shutdown(d)  # also after an error or an early stop, so that NCCL ends cleanly


def _train(name: str, dataset: DatasetConfig, settings: TrainSettings, seed: int, paths: TrainPaths,
           stop_after: int | None, d: Dist) -> dict[str, Any]:
    trainer = Trainer(name, dataset, settings, seed, paths, d)
    resumed = trainer.resume()
    params = {"dataset": name, "task": dataset.task, "max_length": dataset.max_length, "train": settings.model_dump(),
              "world_size": d.world, "model_parameters": num_parameters(trainer.model),
              "encoder": {"kind": trainer.encoder.kind, "dim": trainer.encoder.dim}}
    if d.main:
        print(f"train {name}: {settings.preset}, {num_parameters(trainer.model):,} parameters, "
              f"{'resuming at step ' + str(trainer.step) if resumed else 'from scratch'}, "
              f"{d.world} process(es), {trainer.micro}-row micro-batches, lr {settings.learning_rate:g}")
    with _mlflow_context(trainer, params) as run:
        if d.main and run is not None:
            import mlflow

            trainer.mlflow_run_id = run.info.run_id
        target = settings.steps if stop_after is None else min(settings.steps, trainer.step + stop_after)
        progress = tqdm(total=settings.steps, initial=trainer.step, desc=f"train {name}", disable=not d.main,
                        mininterval=1.0)
        window_tokens, window_start = torch.zeros((), device=d.device), time.perf_counter()
        while trainer.step < target:
            stats = trainer.train_step()
            window_tokens += stats.pop("tokens")  # stays on the device: no sync until the next log line
            log_now = trainer.step % settings.log_every == 0 or trainer.step == target
            save_now = trainer.step % settings.checkpoint_every == 0 or trainer.step == target
            if log_now or save_now:  # never checkpoint weights that a non-finite loss has spoilt
                loss = float(stats["loss"])
                if not math.isfinite(loss):
                    raise ElfError(f"train {name}: loss is {loss} at step {trainer.step}; "
                                   "lower train.lr or check the data")
            if log_now:
                metrics = {k: float(v) for k, v in stats.items()}
                metrics["lr"] = trainer.scheduler.get_last_lr()[0]
                elapsed = time.perf_counter() - window_start
                metrics["tokens_per_s"] = float(window_tokens) / max(elapsed, 1e-9)
                window_tokens, window_start = torch.zeros((), device=d.device), time.perf_counter()
                trainer.history.append({"step": trainer.step, **metrics})
                if d.main:
                    mlflow.log_metrics(metrics, step=trainer.step)
                    progress.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            progress.update(1)
            if save_now:
                trainer.save_checkpoint()
        progress.close()
        if trainer.step < settings.steps:
            return {"step": trainer.step}
        return _finish(trainer, run)


def _finish(trainer: Trainer, run) -> dict[str, Any]:
    """Write the EMA model, metrics and plot (rank 0), and attach the model to the MLflow run."""
    d, paths = trainer.d, trainer.paths
    if not d.main:
        return {}
    ema_model = trainer.ema.ema_model(trainer.model)
    metadata = {"dataset": trainer.name, "task": trainer.dataset.task, "max_length": trainer.dataset.max_length,
                "max_input_length": trainer.dataset.max_input_length, "step": trainer.step,
                "tokenizer_hash": trainer.tokens_manifest["tokenizer_hash"],
                "encoder_content_hash": read_json(paths.encoder / "encoder.json", "encoder record")["content_hash"],
                "objective": asdict(trainer.objective), "mlflow_run_id": trainer.mlflow_run_id}
    tmp = paths.out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(ema_model, tmp, metadata)
    shutil.rmtree(paths.model, ignore_errors=True)
    os.replace(tmp, paths.model)
    last = trainer.history[-1] if trainer.history else {}
    summary = {"dataset": trainer.name, "steps": trainer.step, "mlflow_run_id": trainer.mlflow_run_id,
               **{k: last[k] for k in ("loss", "mse", "ce", "decode_acc", "tokens_per_s") if k in last}}
    paths.metrics.mkdir(parents=True, exist_ok=True)
    write_json_atomic(paths.metrics / "train.json", summary)
    _plot_loss(trainer.history, paths.metrics / "train_loss.png", f"ELF training: {trainer.name}")
    if run is not None:
        import mlflow

        mlflow.log_artifacts(str(paths.model), artifact_path="model")
        mlflow.log_artifact(str(paths.metrics / "train_loss.png"))
    (paths.out / "mlflow_run_id").write_text(f"{trainer.mlflow_run_id}\n", encoding="utf-8")
    print(json.dumps(summary))
    return summary
