"""The autoregressive baseline (`train.*.family: ar`): ELF's transformer with a causal mask, trained by teacher
forcing and sampled one token per network pass.

Input/target layout: the input is the row shifted right by one with EOS in front (EOS doubles as
beginning-of-sequence, as GPT-2's <|endoftext|>), so position ℓ predicts token ℓ from tokens < ℓ:
    input  = [EOS, x_0, …, x_{L−2}],  target = [x_0, …, x_{L−1}].
The loss is the mean token cross-entropy over the loss tokens (lm: the real tokens; seq2seq: the target
region, EOS padding included, as ELF), so for seq2seq the source is a prefix the model conditions on and is
never predicted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from elf.families.mdlm import sample_categorical
from elf.vocab import EOS_ID, PAD_ID


def shift_right(ids: Tensor) -> Tensor:
    """[B, L] → [B, L]: EOS, then ids without their last token (the teacher-forcing input)."""
    return torch.cat([torch.full_like(ids[:, :1], EOS_ID), ids[:, :-1]], dim=1)


def ar_row_terms(network, ids: Tensor, loss_mask: Tensor, source_mask: Tensor) -> dict[str, Tensor]:
    """Per row [B]: `nll` = Σ next-token CE over the loss tokens, `correct` = loss tokens predicted right (argmax),
    `tokens` = their count. Shared by the training and the validation loss."""
    loss_mask = loss_mask & ~source_mask
    logits = network(shift_right(ids)).float()
    nll = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    nll = torch.where(loss_mask, nll, torch.zeros_like(nll))
    return {"nll": nll.sum(1), "correct": ((logits.argmax(-1) == ids) & loss_mask).sum(1), "tokens": loss_mask.sum(1)}


def ar_loss(network, ids: Tensor, loss_mask: Tensor, source_mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean next-token cross-entropy over the loss tokens (ids [B, L], masks [B, L] bool) and the trainer's
    statistics (the keys of ELF's loss; mse 0)."""
    terms = ar_row_terms(network, ids, loss_mask, source_mask)
    n = terms["tokens"].sum()
    mean = terms["nll"].sum() / n.clamp(min=1)
    zero = torch.zeros((), device=ids.device)
    return mean, {"loss_tokens": n, "mse": zero, "denoise_tokens": zero.long(), "decode_tokens": n,
                  "ce": mean.detach(), "acc": terms["correct"].sum() / n.clamp(min=1)}


@torch.no_grad()
def ar_sample(network, shape: tuple[int, int], generator: torch.Generator, greedy: bool = False,
              source_ids: Tensor | None = None, source_mask: Tensor | None = None) -> tuple[Tensor, int]:
    """Left-to-right sampling → (ids [B, L] long, network passes per sample).

    One pass per generated position over the prefix so far (no KV cache: the count of network evaluations is
    what the comparison measures). `greedy` takes the argmax; otherwise tokens are drawn from the softmax in
    float64 (`sample_categorical`). source_ids / source_mask [B, L] (conditional rows): the source is a given
    prefix, kept as is. Stops early once every row has produced an EOS after its source.
    """
    from elf.runtime import autocast

    device = generator.device
    b, length = shape
    ids = torch.full(shape, PAD_ID, dtype=torch.long, device=device)
    given = torch.zeros(shape, dtype=torch.bool, device=device)
    if source_ids is not None:
        given = source_mask.to(device=device, dtype=torch.bool)
        ids = torch.where(given, source_ids.to(device), ids)
    start = int(given.sum(1).min()) if source_ids is not None else 0
    ended = torch.zeros(b, dtype=torch.bool, device=device)
    calls = 0
    for position in range(start, length):
        with autocast(device):
            logits = network(shift_right(ids)[:, :position + 1])[:, position].float()
        calls += 1
        token = logits.argmax(-1) if greedy else sample_categorical(logits.softmax(-1), generator).to(device)
        keep = given[:, position]
        ids[:, position] = torch.where(keep, ids[:, position], token)
        ended |= ~keep & (token == EOS_ID)
        if bool(ended.all()):
            break
    return ids, calls
