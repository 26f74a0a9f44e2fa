"""One optimisation step of ELF: the training hot path, shared by `elf train` and the benchmarks.

    step = TrainStep(model, optimizer, scheduler, ema, ObjectiveConfig(), seed=42, d=init_distributed(),
                     local_batch=64, micro_batch=64, grad_clip=1.0, compile=True)
    stats = step(batch, step_index)    # batch: the loader's dict (x, loss_mask, source_mask, ...)

What one call does (elf-method §3–§6, §8): draw the objective's noise for every row of this process's slice
of the global batch, seeded per (step, row of the global batch) so that any number of processes and
micro-batches sees the same draws; run `elf_loss` per micro-batch under bf16 autocast on GPUs; normalise by
the *global* number of loss tokens; clip the gradient norm, step the optimiser and the lr schedule, update the
EMA. The statistics stay on the device; read them when logging. (The objective itself still syncs where it
selects rows: `nonzero` for the self-conditioning rows and boolean indexing of the decode rows.) A baseline
network (elf/families: MDLM, AR) brings its own loss and draws, keyed by the same row seeds.

Imports only torch and the method's modules (no data, tracking or config stack), so the GPU check runs it on a
machine that has torch alone.
"""

from __future__ import annotations

import contextlib

import torch

from elf.distributed import Dist, all_reduce
from elf.errors import ElfError
from elf.flow import ObjectiveConfig, draw_noise_per_row, elf_loss
from elf.runtime import autocast


def row_seed(seed: int, step: int, row: int) -> int:
    """The noise seed of one row of one global batch (independent of ranks and micro-batches)."""
    return ((seed * 1_000_003 + step) * 1_048_576 + row) % (2**63 - 1)


def micro_batches(batch_size: int, micro_batch_size: int | None, world: int) -> tuple[int, int]:
    """(rows per process per step, rows per micro-batch); errors name the parameter."""
    if batch_size % world:
        raise ElfError(f"params.yaml: train batch_size {batch_size} is not divisible by {world} processes")
    local = batch_size // world
    micro = micro_batch_size or local
    if local % micro:
        raise ElfError(f"params.yaml: train micro_batch_size {micro} does not divide the per-process batch {local}")
    return local, micro


class TrainStep:
    """Everything one optimisation step touches. `model` is the bare network (DDP is added here when the
    run has several processes; `compile` wraps the forward in `torch.compile`)."""

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, ema, objective: ObjectiveConfig, *, seed: int,
                 d: Dist, local_batch: int, micro_batch: int, grad_clip: float, compile: bool = False):
        from elf.families import network_family

        self.model, self.optimizer, self.scheduler, self.ema = model, optimizer, scheduler, ema
        self.family = network_family(model)
        self.objective, self.seed, self.d, self.grad_clip = objective, seed, d, grad_clip
        self.local_batch, self.micro = local_batch, micro_batch
        self.ddp = torch.nn.parallel.DistributedDataParallel(model) if d.world > 1 else None
        module = self.ddp or model
        # dynamic: passes A and B see a different number of rows every step; without it each new size recompiles.
        self.forward = torch.compile(module, dynamic=True) if compile else module

    def _loss(self, mb: dict[str, torch.Tensor], seeds: list[int], length: int, dim: int):
        """The family's loss on one micro-batch (ELF: elf_loss; MDLM / AR: elf/families)."""
        if self.family != "elf":
            from elf.families import baseline_loss

            return baseline_loss(self.family, self.forward, mb, seeds, self.model.cfg.vocab_size)
        draws = draw_noise_per_row(seeds, length, dim, self.objective, self.d.device)
        return elf_loss(self.forward, mb["x"], mb["loss_mask"], mb["source_mask"], mb["cond_dropped"],
                        mb["input_ids"], self.objective, draws=draws)

    def __call__(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """One update on this process's slice of global batch number `step`; returns 0-dim device tensors:
        loss, mse, ce, decode_acc (global means), grad_norm, tokens (valid tokens of the global batch)."""
        d = self.d
        loss_mask = batch["loss_mask"] & ~batch["source_mask"]
        # Σ over the global batch of loss tokens: the shared denominator of §4, across ranks and micro-batches.
        n_global = all_reduce(loss_mask.sum().float().reshape(1), d)[0].clamp(min=1.0)
        sums = torch.zeros(7, device=d.device)  # loss, mse·n, ce·n, correct, n_denoise, n_decode, tokens
        length, dim = batch["x"].shape[1], batch["x"].shape[2]
        first_row = d.rank * self.local_batch
        for start in range(0, self.local_batch, self.micro):
            mb = {k: v[start:start + self.micro] for k, v in batch.items()}
            seeds = [row_seed(self.seed, step, first_row + start + i) for i in range(self.micro)]
            last = start + self.micro >= self.local_batch
            sync = contextlib.nullcontext() if (self.ddp is None or last) else self.ddp.no_sync()
            with sync:
                with autocast(d.device):
                    loss, stats = self._loss(mb, seeds, length, dim)
                n_local = stats["loss_tokens"].float()
                # DDP averages gradients over ranks, hence × world: the result is Σ(loss sums) / n_global.
                (loss * n_local * d.world / n_global).backward()
            sums += torch.stack([
                (loss * n_local).detach().float(), stats["mse"] * stats["denoise_tokens"],
                stats["ce"] * stats["decode_tokens"], stats["acc"] * stats["decode_tokens"],
                stats["denoise_tokens"].float(), stats["decode_tokens"].float(), mb["valid_mask"].sum().float(),
            ])
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.ema.update(self.model)
        sums = all_reduce(sums, d)
        return {
            "loss": sums[0] / n_global,
            "mse": sums[1] / sums[4].clamp(min=1.0),
            "ce": sums[2] / sums[5].clamp(min=1.0),
            "decode_acc": sums[3] / sums[5].clamp(min=1.0),
            "grad_norm": grad_norm.detach().float(),
            "tokens": sums[6],
        }
