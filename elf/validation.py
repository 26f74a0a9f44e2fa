"""Validation loss: the ELF objective (or a baseline's, elf/families) on held-out rows, at fixed t and noise.

The training loss is a poor progress signal: it mixes a random t (mostly very noisy, §3), random
self-conditioning and guidance draws, and decode rows, all redrawn every step. Here the same held-out rows
(the first `rows` rows of `data/tokens/<ds>/validation`) are scored with the same noise every time
(`VALIDATION_SEED`, not the training seed), so two runs, or a run and its resumption, give comparable curves:

- denoise: the §3 squared velocity error (channel mean, averaged over a row's loss tokens) of the network's
  x-prediction at each t in `t_values`, self-conditioning input 0 (the m = 0 branch of §6, whose target is the
  plain velocity) and guidance input w = 1;
- decode: the §4 token cross-entropy and accuracy at t = 1 on the per-token corrupted input (c = 0).

Per row, `loss = (1 − decode_prob)·mean_t(mse) + decode_prob·ce`: the objective's mix of row kinds with t on
a fixed grid instead of the logit-normal draw. Means are over rows; `_se` is the standard error over rows
(std / √n), the noise of the figure itself. The EMA weights are scored: they are what is sampled and shipped.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from elf.data.embed import read_token_rows
from elf.data.layout import loss_mask, stack_lm, stack_seq2seq
from elf.distributed import Dist, all_reduce
from elf.encoders import FrozenEncoder
from elf.errors import ElfError
from elf.flow import ObjectiveConfig, decode_corruption, draw_noise_per_row, noise_path, velocity_target, x_to_v
from elf.runtime import autocast

VALIDATION_SEED = 1_234_567
"""The noise of validation row i is keyed by (this seed, i) alone: the same in every run and resume."""


class Validator:
    """Scores a network on fixed held-out rows (see the module docstring); build once, call at every check.

    `tokens_dir`: data/tokens/<ds>/validation; `length`: the dataset's max_length; rows are split over the
    processes of `d` (rank r takes rows r, r + world, ...) and the sums reduced on `d.device`. The clean
    embeddings are encoded once, `micro_batch` rows at a time, and kept in host memory; each check moves one
    micro-batch at a time to the device and redraws its noise from the rows' keys (counter-based: the same values
    every time), so the device holds no more than a training micro-batch does.
    """

    def __init__(self, tokens_dir: Path, task: str, length: int, encoder: FrozenEncoder, objective: ObjectiveConfig,
                 rows: int, t_values: list[float], d: Dist, micro_batch: int, family: str = "elf"):
        self.objective, self.t_values, self.d, self.micro = objective, list(t_values), d, micro_batch
        self.family = family
        self.length = length
        held_out = read_token_rows(tokens_dir, task, rows)
        if not held_out:
            raise ElfError(f"{tokens_dir}: the validation split has no rows")
        self.rows = len(held_out)
        self.row_index = list(range(d.rank, self.rows, d.world))
        mine = [held_out[i] for i in self.row_index]
        if task == "lm":
            input_ids, valid_mask = stack_lm([r[0] for r in mine], length)
            source_mask = torch.zeros_like(valid_mask)
        else:
            input_ids, source_mask, valid_mask = stack_seq2seq([r[0] for r in mine], [r[1] for r in mine], length)
        chunks = []
        with torch.no_grad():
            for start in range(0, len(mine) if family == "elf" else 0, micro_batch):  # baselines read ids only
                ids, valid, source = (t[start:start + micro_batch] for t in (input_ids, valid_mask, source_mask))
                if task == "lm":
                    x = encoder.encode_lm(ids, valid).cpu().masked_fill(~valid[..., None], 0.0)
                else:
                    x = encoder.encode_conditional(ids, source, valid, torch.zeros(len(ids), dtype=torch.bool)).cpu()
                chunks.append(x.float())
        self.dim = encoder.dim
        self.batch = {"x": torch.cat(chunks) if chunks else torch.zeros(len(input_ids), length, 0),
                      "input_ids": input_ids, "source_mask": source_mask,
                      "loss_mask": loss_mask(task, source_mask, valid_mask) & ~source_mask}

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """{"loss", "loss_se", "mse", "mse_se", "ce", "ce_se", "decode_acc", "mse_t<t>", "rows"} of `model`
        (the bare network, in eval mode) on the validation rows; the same on every process."""
        device = self.d.device
        parts = [self._score(model, start) for start in range(0, len(self.row_index), self.micro)]
        per_row = (torch.cat(parts) if parts else torch.zeros(0, 4 + len(self.t_values), device=device)).double()
        count = torch.tensor([float(len(per_row))], dtype=torch.float64, device=device)
        sums = all_reduce(torch.cat([per_row.sum(0), per_row.pow(2).sum(0), count]), self.d)
        k = per_row.shape[1]
        total, squares, n = sums[:k], sums[k:2 * k], float(sums[-1])
        mean = total / n
        var = (squares / n - mean.pow(2)).clamp(min=0.0) * n / max(n - 1.0, 1.0)
        se = (var / n).sqrt()
        per_t = "mse" if self.family == "elf" else "loss"
        names = ["loss", "mse", "ce", "decode_acc", *(f"{per_t}_t{t:g}" for t in self.t_values)]
        out = {name: float(mean[i]) for i, name in enumerate(names)}
        out.update({f"{name}_se": float(se[i]) for i, name in enumerate(names[:3])})
        out["rows"] = int(n)
        return out

    def _score(self, model, start: int) -> torch.Tensor:
        """[rows, 4 + len(t)] per row of one micro-batch: loss, mean mse, ce, decode accuracy, mse at each t."""
        cfg, device = self.objective, self.d.device
        part = {k: v[start:start + self.micro].to(device) for k, v in self.batch.items()}
        seeds = [VALIDATION_SEED * 1_048_576 + i for i in self.row_index[start:start + self.micro]]
        if self.family != "elf":
            return self._score_baseline(model, part, seeds)
        draws = draw_noise_per_row(seeds, self.length, self.dim, cfg, device)
        x, eps, mask, source = part["x"], draws["eps"], part["loss_mask"], part["source_mask"][..., None]
        n = len(x)
        tokens = mask.sum(1).clamp(min=1)
        self_cond = torch.where(source, x, torch.zeros_like(x))
        ones, no_decode = torch.ones(n, device=device), torch.zeros(n, dtype=torch.bool, device=device)
        mse = []
        for t_value in self.t_values:
            t = torch.full((n,), t_value, device=device)
            z = torch.where(source, x, noise_path(x, eps, t, cfg.noise_scale))
            with autocast(device):
                x_hat, _ = model(z, self_cond, t, ones, no_decode, return_logits=False)
            v_hat = x_to_v(x_hat.float(), z, t, cfg.min_denom)
            error = (v_hat - velocity_target(x, eps, cfg.noise_scale)).pow(2).mean(-1)
            mse.append((error * mask).sum(1) / tokens)
        mse = torch.stack(mse, 1)  # [n, len(t)]
        z_dec = torch.where(source, x, decode_corruption(x, eps, draws["keep"], cfg.decode_noise_scale))
        with autocast(device):
            _, logits = model(z_dec, torch.zeros_like(x), ones, ones, ~no_decode, return_logits=True)
        logits = logits.float()
        ce = F.cross_entropy(logits.transpose(1, 2), part["input_ids"], reduction="none")
        ce = (ce * mask).sum(1) / tokens
        acc = ((logits.argmax(-1) == part["input_ids"]) & mask).sum(1) / tokens
        mean_mse = mse.mean(1)
        loss = (1.0 - cfg.decode_prob) * mean_mse + cfg.decode_prob * ce
        return torch.cat([torch.stack([loss, mean_mse, ce, acc], 1), mse], 1)

    def _score_baseline(self, model, part: dict[str, torch.Tensor], seeds: list[int]) -> torch.Tensor:
        """The columns of `_score` for a baseline (elf/families), per row:

        MDLM: at each t the ELBO term (1/t)·Σ masked CE per loss token, masks drawn from the row's key (the
        validation loss is their mean over t, a fixed-grid estimate of the ELBO); ce and accuracy over the masked
        tokens of all t. AR: the next-token CE per loss token at every t (t is not an input). mse is 0.
        """
        from elf.families.ar import ar_row_terms
        from elf.families.mdlm import draw_mask_per_row, mdlm_row_terms

        ids, mask, source = part["input_ids"], part["loss_mask"], part["source_mask"]
        n, device = len(ids), self.d.device
        if self.family == "ar":
            with autocast(device):
                terms = ar_row_terms(model, ids, mask, source)
            tokens = terms["tokens"].clamp(min=1)
            ce, acc = terms["nll"] / tokens, terms["correct"] / tokens
            per_t = ce[:, None].expand(n, len(self.t_values))
            return torch.cat([torch.stack([ce, torch.zeros_like(ce), ce, acc], 1), per_t], 1)
        u = draw_mask_per_row(seeds, ids.shape[1], device)["u"]
        elbo, nll, correct, masked = [], 0.0, 0.0, 0.0
        for t_value in self.t_values:
            with autocast(device):
                terms = mdlm_row_terms(model, ids, mask, source, torch.full((n,), t_value, device=device), u,
                                       model.cfg.mask_id)
            elbo.append(terms["elbo"] / terms["tokens"].clamp(min=1))
            nll, correct, masked = nll + terms["nll"], correct + terms["correct"], masked + terms["masked"]
        elbo = torch.stack(elbo, 1)
        ce, acc = nll / masked.clamp(min=1), correct / masked.clamp(min=1)
        return torch.cat([torch.stack([elbo.mean(1), torch.zeros_like(ce), ce, acc], 1), elbo], 1)
