"""The train stage: one model per dataset (ELF or a baseline family), one process or `torchrun` DDP, resumable exactly.

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
runs with `persist: true`, and resumed automatically) and `model/` — the final EMA network with its tokenizer
and encoder, a self-contained directory (`elf.pretrained.ELFPipeline.from_pretrained`). Also `metrics/<ds>/train.json`
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
from elf.data.shards import read_manifest
from elf.data.tokenizer import load_tokenizer, tokenizer_hash
from elf.data.tokens import FORMAT as TOKENS_FORMAT
from elf.distributed import Dist, barrier, init_distributed, shutdown
from elf.encoders import load_encoder
from elf.errors import ElfError
from elf.families import build_network
from elf.files import (
    atomic_file,
    atomic_output_dir,
    naming_os_errors,
    read_json,
    write_csv_atomic,
    write_json_atomic,
    write_text_atomic,
)
from elf.flow import ObjectiveConfig
from elf.hashing import file_sha256
from elf.model import num_parameters
from elf.optim import EMA, build_optimizer, warmup_constant_schedule
from elf.pretrained import ELFPipeline
from elf.runtime import configure_device, on_terminal
from elf.step import TrainStep, micro_batches
from elf.validation import Validator


@dataclass(frozen=True)
class TrainPaths:
    tokens: Path  # data/tokens/<ds>/train
    embeddings: Path | None  # data/embeddings/<ds>/train when cached, else None (online encoding)
    encoder: Path  # data/encoder
    tokenizer: Path  # data/tokenizer (copied into the model directory with the encoder)
    out: Path  # models/<ds>
    metrics: Path  # metrics/<ds>

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    @property
    def model(self) -> Path:
        return self.out / "model"


RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "nproc_per_node", "compile",
                     "validation")


def run_record(dataset: DatasetConfig, settings: TrainSettings, seed: int, paths: TrainPaths,
               device: torch.device) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: everything but the settings that may change midway.
    On CPUs that includes the thread count: kernels split work by it, so it changes the last bits of a run."""
    # An ELF run's record leaves the family out, so checkpoints made before families existed still resume.
    fixed = set(RESUMABLE_CHANGES) | ({"family"} if settings.family == "elf" else set())
    train = settings.model_dump(mode="json", exclude=fixed)
    if train["model"].get("time_conditioning") is None:  # unset (ELF, and MDLM's default): as before the field
        train["model"].pop("time_conditioning", None)
    record = {"dataset": dataset.model_dump(mode="json"), "seed": seed, "train": train,
            "tokens": file_sha256(paths.tokens / "manifest.json"),
            "encoder": read_json(paths.encoder / "encoder.json", "encoder record")["content_hash"]}
    if device.type == "cpu":
        record["cpu_threads"] = torch.get_num_threads()
    return record


def fingerprint(record: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def changed_settings(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """The keys two run records differ in, as dotted names (`train.lr`, `tokens`): what the user changed."""
    if old is None:
        return ["data, encoder or settings (recorded by an older version)"]
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) or (k in a) != (k in b)]
        elif a != b or (key in old) != (key in new):
            changed.append(key)
    return changed


class Trainer:
    """Holds everything a step needs, and everything a checkpoint must restore."""

    def __init__(self, name: str, dataset: DatasetConfig, settings: TrainSettings, seed: int, paths: TrainPaths,
                 d: Dist):
        self.name, self.dataset, self.settings, self.seed, self.paths, self.d = name, dataset, settings, seed, paths, d
        tokens_manifest = read_manifest(paths.tokens, TOKENS_FORMAT)
        if not paths.tokenizer.is_dir():
            raise ElfError(f"{paths.tokenizer}: tokenizer directory not found (run the tokenizer stage first)")
        if tokenizer_hash(paths.tokenizer) != tokens_manifest["tokenizer_hash"]:
            raise ElfError(f"{paths.tokens}: tokenized with another tokenizer than {paths.tokenizer} "
                           "(rerun the tokenize stage)")
        self.encoder = load_encoder(paths.encoder, expected_tokenizer_hash=tokens_manifest["tokenizer_hash"]).to(
            d.device)
        self.tokens_manifest = tokens_manifest
        self.local_batch, self.micro = micro_batches(settings.batch_size, settings.micro_batch_size, d.world)
        torch.manual_seed(seed)  # identical initial weights on every rank
        self.model = build_network(settings.family, settings.preset, self.encoder.dim, tokens_manifest["vocab_size"],
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
        self.run_record = run_record(dataset, settings, seed, paths, d.device)
        self.fingerprint = fingerprint(self.run_record)
        self.validator = self._validator(paths.tokens.parent / "validation") if settings.validation.every else None
        self.step = 0
        # Wall seconds spent training up to the last checkpoint, over every segment (a killed segment's work after
        # its last checkpoint is lost, and so is its time): what the run cost, kept in the checkpoints.
        self._segment_began = time.perf_counter()
        self._segment_seconds_before = 0.0
        self.history: list[dict[str, float]] = []
        self.validation_history: list[dict[str, float]] = []
        self._ema_copy: torch.nn.Module | None = None  # the network holding the EMA weights for validation, made once
        self.mlflow_run_id: str | None = None  # this segment's run (a child of the training's run)
        self.mlflow_parent_run_id: str | None = None  # the training's run: the parent of every segment
        torch.manual_seed(seed + 1 + d.rank)  # per-rank stream for anything else random

    def _validator(self, tokens: Path) -> Validator:
        if not (tokens / "manifest.json").is_file() or not read_manifest(tokens, TOKENS_FORMAT)["rows"]:
            raise ElfError(f"{tokens}: no validation rows for the validation loss; give datasets.{self.name} a "
                           f"validation split, or set train.datasets.{self.name}.validation.every: 0")
        settings = self.settings.validation
        return Validator(tokens, self.dataset.task, self.dataset.max_length, self.encoder, self.objective,
                         settings.rows, settings.t_values, self.d, self.micro, family=self.settings.family)

    def _validation_settings(self) -> dict[str, Any]:
        return self.settings.validation.model_dump(mode="json", exclude={"every"})

    def ema_copy(self) -> torch.nn.Module:
        """The network with the EMA weights of now, in eval mode (one copy, refreshed on every call)."""
        if self._ema_copy is None:
            self._ema_copy = self.ema.ema_model(self.model)
        else:
            self.ema.copy_to(self._ema_copy)
        return self._ema_copy

    def validate(self) -> dict[str, float]:
        """The validation figures of the EMA weights now (elf/validation.py), kept in the history."""
        figures = {"step": self.step, **self.validator(self.ema_copy())}
        self.validation_history.append(figures)
        return figures

    # -- one optimisation step ------------------------------------------------------------------------------

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimisation step (elf/step.py); its statistics stay on the device until read."""
        stats = self.train_step_fn(next(self.loader), self.step)
        self.step += 1
        return stats

    # -- checkpoints ----------------------------------------------------------------------------------------

    def _set_aside(self, checkpoints: list[Path], label: str, reason: str) -> None:
        """Move checkpoints out of the way (main process), with one notice saying where and why."""
        barrier(self.d)
        if self.d.main:
            target = ckpt.move_aside(checkpoints, self.paths.out, label)
            print(f"train {self.name}: moved {len(checkpoints)} checkpoint(s) from {self.paths.checkpoints} to "
                  f"{target}: {reason}. Move them back to resume them.", file=sys.stderr)
        barrier(self.d)

    def save_checkpoint(self) -> None:
        root = self.paths.checkpoints
        tmp = ckpt.tmp_dir(root, self.step)
        if self.d.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.d)
        try:
            with naming_os_errors(ckpt.step_dir(root, self.step), temporary=tmp):
                self._write_checkpoint_files(tmp)
                barrier(self.d)
                if self.d.main:
                    ckpt.finalise(root, self.step, self.settings.keep_checkpoints)
        except BaseException:  # a full disk, a kill signal: no half-written checkpoint stays behind
            if self.d.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        barrier(self.d)

    def _write_checkpoint_files(self, tmp: Path) -> None:
        ckpt.save_tensors(tmp / f"rank-{self.d.rank}-rng.safetensors", ckpt.rng_state())
        ckpt.write_json(tmp / f"rank-{self.d.rank}.json", {"loader": self.loader.state_dict()})
        if self.d.main:
            ckpt.save_tensors(tmp / "model.safetensors", self.model.state_dict())
            ema = self.ema.state_dict()
            ckpt.save_tensors(tmp / "ema.safetensors", ema["shadow"])
            ckpt.save_optimizer_state(tmp / "optimizer.pt", self.optimizer.state_dict())
            ckpt.write_json(tmp / "trainer.json", {
                "step": self.step, "world_size": self.d.world, "scheduler": self.scheduler.state_dict(),
                "ema": {"decay": ema["decay"], "num_updates": ema["num_updates"]}, "history": self.history,
                "validation_history": self.validation_history, "validation_settings": self._validation_settings(),
                "mlflow_parent_run_id": self.mlflow_parent_run_id, "mlflow_run_id": self.mlflow_run_id,
                "fingerprint": self.fingerprint, "run_record": self.run_record, "train_seconds": self.elapsed(),
            })

    def elapsed(self) -> float:
        """Wall seconds of training so far: earlier segments' (from the checkpoint) plus this one's."""
        return self._segment_seconds_before + time.perf_counter() - self._segment_began

    def resume(self) -> bool:
        """Restore the newest checkpoint, if any. A corrupt one is an error, not a fresh start."""
        if self.d.main:
            ckpt.clean_partial(self.paths.checkpoints)
        barrier(self.d)
        found = ckpt.list_checkpoints(self.paths.checkpoints)
        past = [c for c in found if ckpt.checkpoint_step(c) > self.settings.steps]
        if past:
            # train.steps was lowered below what was trained: those checkpoints would finish the run at the
            # wrong step. Set them aside and resume from an earlier one if kept, else from scratch.
            found = found[: len(found) - len(past)]
            self._set_aside(past, f"past-step-{self.settings.steps}",
                            f"train.steps is {self.settings.steps}, below their steps")
        # Checkpoints of another run (other data, encoder or settings: e.g. `dvc repro` after a params edit)
        # are not corrupt: set them aside, naming what changed, and resume from the newest one of this run.
        states = {c: ckpt.read_trainer_state(c) for c in found}
        foreign = [c for c in found if states[c].get("fingerprint") != self.fingerprint]
        if foreign:
            old = states[foreign[-1]]
            changed = ", ".join(changed_settings(old.get("run_record"), self.run_record))
            self._set_aside(foreign, f"run-{str(old.get('fingerprint'))[:12]}",
                            f"they belong to another run (changed: {changed}; only "
                            f"{', '.join(RESUMABLE_CHANGES)} may change and still resume)")
            found = [c for c in found if c not in foreign]
        if not found:
            return False
        directory = found[-1]
        ckpt.verify(directory)
        state = states[directory]
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
        self._segment_seconds_before, self._segment_began = state.get("train_seconds", 0.0), time.perf_counter()
        self.history = state["history"]
        self.validation_history = state.get("validation_history", [])
        recorded = state.get("validation_settings", self._validation_settings())  # older checkpoints: as now
        if self.validation_history and recorded != self._validation_settings():
            if self.d.main:  # one curve, one definition: the earlier curve stays in MLflow and the checkpoint
                print(f"train {self.name}: validation settings changed; the validation curve starts anew",
                      file=sys.stderr)
            self.validation_history = []
        if "mlflow_parent_run_id" in state:
            self.mlflow_parent_run_id, self.mlflow_run_id = state["mlflow_parent_run_id"], state.get("mlflow_run_id")
        else:  # older checkpoints kept one run for the whole training: it becomes the parent
            self.mlflow_parent_run_id = state.get("mlflow_run_id")
        return True


def _plot_loss(history: list[dict[str, float]], validation: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [h["step"] for h in history]
    axes[0].plot(steps, [h["loss"] for h in history], label="loss")
    axes[0].plot(steps, [h["mse"] for h in history], label="mse (denoise)", alpha=0.7)
    if validation:
        axes[0].errorbar([h["step"] for h in validation], [h["loss"] for h in validation],
                         yerr=[h["loss_se"] for h in validation], marker="o", label="validation loss (EMA)")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[1].plot(steps, [h["ce"] for h in history], label="ce (decode)")
    axes[1].plot(steps, [h["decode_acc"] for h in history], label="decode accuracy")
    axes[1].legend()
    for ax in axes:
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


@contextlib.contextmanager
def _mlflow_context(trainer: Trainer, params: dict[str, Any]):
    """The MLflow run of this training segment (rank 0; None elsewhere).

    Every call of `train` is a segment — a fresh start, a resume after a crash, an extension to more steps —
    and gets its own run, a child of the training's run (one per training from step 0, kept in the
    checkpoints). Its params, metrics from its first step, the model it ends with (a logged model of its own,
    elf/mlflow_model.py) and later the evaluation of that model all stay apart from other segments', so a
    registered version always points at the copy its segment logged.
    """
    from elf.tracking import flatten, git_commit, mlflow_run

    if not trainer.d.main:
        yield None
        return
    import mlflow

    paths = trainer.paths
    tags = {"dataset": trainer.name, "tokens_manifest_sha256": file_sha256(paths.tokens / "manifest.json"),
            "encoder_content_hash": read_json(paths.encoder / "encoder.json", "encoder record")["content_hash"]}
    if paths.embeddings is not None:
        tags["embeddings_manifest_sha256"] = file_sha256(paths.embeddings / "manifest.json")
    if trainer.step >= trainer.settings.steps and trainer.mlflow_run_id is not None:
        # Nothing left to train (e.g. `dvc repro` after a change of log_every): no new segment, its run again.
        with mlflow_run(f"elf-{trainer.name}", f"train-{trainer.name}", tags=tags, run_id=trainer.mlflow_run_id) as run:
            yield run
        return
    with mlflow_run(f"elf-{trainer.name}", f"train-{trainer.name}", tags=tags,
                    run_id=trainer.mlflow_parent_run_id) as parent:
        trainer.mlflow_parent_run_id = parent.info.run_id
        start = trainer.step
        with mlflow.start_run(run_name=f"train-{trainer.name} from step {start}", nested=True,
                              log_system_metrics=True) as segment:
            mlflow.log_params(flatten(params))
            commit = git_commit()
            mlflow.set_tags({**tags, "segment_start_step": str(start), **({"git_commit": commit} if commit else {})})
            try:
                yield segment
            finally:
                with contextlib.suppress(Exception):  # never hide the error that ended the segment
                    mlflow.set_tag("segment_end_step", str(trainer.step))


def train(name: str, dataset: DatasetConfig, settings: TrainSettings, seed: int, paths: TrainPaths,
          stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) to `settings.steps`; `stop_after` ends early after that many steps of this call
    (for tests of resume). Returns the final metrics (rank 0)."""
    d = init_distributed()
    configure_device(d.device)
    try:
        with exclusive_model_dir(paths.out, d):
            return _train(name, dataset, settings, seed, paths, stop_after, d)
    finally:
        shutdown(d)  # also after an error or an early stop, so that NCCL ends cleanly


@contextlib.contextmanager
def exclusive_model_dir(out: Path, d: Dist):
    """One training per model directory: two at once would race on the same checkpoint files. The lock
    (`filelock`, released by the OS if the holder dies) sits beside the directory, outside what DVC tracks;
    the main process of a run holds it. A second training gets a one-line error naming the holder."""
    if not d.main:
        yield
        return
    import socket

    from filelock import FileLock, Timeout

    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.train.lock"
    owner_path = out.parent / f".{out.name}.train.owner"
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = owner_path.read_text(encoding="utf-8").strip() if owner_path.is_file() else "another process"
        raise ElfError(f"{out}: another training is running on it ({holder}); wait for it to end or stop it") from None
    try:
        owner_path.write_text(f"pid {os.getpid()} on {socket.gethostname()}, since "
                              f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n", encoding="utf-8")
        yield
    finally:
        lock.release()


def _train(name: str, dataset: DatasetConfig, settings: TrainSettings, seed: int, paths: TrainPaths,
           stop_after: int | None, d: Dist) -> dict[str, Any]:
    trainer = Trainer(name, dataset, settings, seed, paths, d)
    resumed = trainer.resume()
    params = {"dataset": name, "task": dataset.task, "max_length": dataset.max_length, "train": settings.model_dump(),
              "world_size": d.world, "model_parameters": num_parameters(trainer.model),
              "encoder": {"kind": trainer.encoder.kind, "dim": trainer.encoder.dim}}
    if d.main:
        print(f"train {name}: {settings.family} {settings.preset}, {num_parameters(trainer.model):,} parameters, "
              f"{'resuming at step ' + str(trainer.step) if resumed else 'from scratch'}, "
              f"{d.world} process(es), {trainer.micro}-row micro-batches, lr {settings.learning_rate:g}")
    with _mlflow_context(trainer, params) as run:
        if run is not None:
            import mlflow

            trainer.mlflow_run_id = run.info.run_id
        target = settings.steps if stop_after is None else min(settings.steps, trainer.step + stop_after)
        bar = d.main and on_terminal()  # elsewhere: a log line every log_every steps
        progress = tqdm(total=settings.steps, initial=trainer.step, desc=f"train {name}", disable=not bar,
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
                    if not bar:
                        print(f"train {name}: step {trainer.step}/{settings.steps} loss {metrics['loss']:.4f} "
                              f"{metrics['tokens_per_s']:,.0f} tokens/s", flush=True)
            progress.update(1)
            every = settings.validation.every
            if every and (trainer.step % every == 0 or trainer.step == settings.steps):
                figures = trainer.validate()
                if d.main:
                    mlflow.log_metrics({f"val/{k}": v for k, v in figures.items() if k != "step"}, step=trainer.step)
                    if not bar:
                        print(f"train {name}: step {trainer.step} validation loss {figures['loss']:.4f} "
                              f"± {figures['loss_se']:.4f} ({figures['rows']} rows)", flush=True)
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
    ema_model = trainer.ema_copy()
    metadata = {"dataset": trainer.name, "task": trainer.dataset.task, "max_length": trainer.dataset.max_length,
                "max_input_length": trainer.dataset.max_input_length, "step": trainer.step,
                "tokenizer_hash": trainer.tokens_manifest["tokenizer_hash"],
                "encoder_content_hash": read_json(paths.encoder / "encoder.json", "encoder record")["content_hash"],
                "objective": asdict(trainer.objective), "mlflow_run_id": trainer.mlflow_run_id}
    with atomic_output_dir(paths.model) as tmp:  # self-contained: weights, tokenizer, encoder (elf/pretrained.py)
        pipeline = ELFPipeline(ema_model, trainer.encoder, load_tokenizer(paths.tokenizer), metadata,
                               paths.tokenizer, paths.encoder)
        pipeline.save_pretrained(tmp)
    last = trainer.history[-1] if trainer.history else {}
    # train.json is the DVC metric (few numbers: `dvc exp show` stays readable); the rest goes to MLflow, and
    # the loss curve to train_history.csv, a data plot `dvc plots diff` overlays across experiments.
    summary = {"steps": trainer.step, **{k: last[k] for k in ("loss", "decode_acc") if k in last}}
    validation = trainer.validation_history
    if validation and validation[-1]["step"] == trainer.step:
        summary.update({f"val_{k}": validation[-1][k] for k in ("loss", "loss_se")})
    paths.metrics.mkdir(parents=True, exist_ok=True)
    write_json_atomic(paths.metrics / "train.json", summary)
    curve = [{k: h.get(k) for k in ("step", "loss", "mse", "ce", "decode_acc", "lr")} for h in trainer.history]
    write_csv_atomic(paths.metrics / "train_history.csv", curve)
    columns = ["step", "loss", "loss_se", "mse", "ce", "decode_acc"]
    write_csv_atomic(paths.metrics / "validation_history.csv", [{k: h[k] for k in columns} for h in validation],
                     columns)
    _plot_loss(trainer.history, validation, paths.metrics / "train_loss.png",
               f"{trainer.settings.family.upper()} training: {trainer.name}")
    if run is not None:
        import mlflow

        from elf.mlflow_model import log_pyfunc_model
        from elf.tracking import latest_logged_model

        if latest_logged_model(mlflow.MlflowClient(), run.info.run_id) is None:  # one logged model per segment
            log_pyfunc_model(paths.model, trainer.dataset.task)  # the registry's versions are this logged model
        mlflow.log_artifact(str(paths.metrics / "train_loss.png"))
    write_text_atomic(paths.out / "mlflow_run_id", f"{trainer.mlflow_run_id}\n")
    print(json.dumps({"dataset": trainer.name, **summary, "mlflow_run_id": trainer.mlflow_run_id,
                      **{k: last[k] for k in ("mse", "ce", "tokens_per_s") if k in last}}))
    return summary
