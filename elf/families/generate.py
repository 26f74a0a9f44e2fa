"""Many samples from a baseline network in batches: the MDLM / AR counterpart of `elf.sample.generate`."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from elf.errors import ElfError
from elf.sample import Generation, SamplerConfig


def generate_tokens(network: torch.nn.Module, length: int, batch: int, cfg: SamplerConfig, seed: int,
                    device: torch.device | str, num_samples: int | None = None, source_ids: Tensor | None = None,
                    source_mask: Tensor | None = None) -> Generation:
    """`num_samples` rows of `length` ids (default: one per source row, else `batch`) from an MDLM or AR network
    with sampler `cfg` (kind mdlm, ar or ar_greedy); source positions come back as PAD, as ELF's do.

    One generator seeded with `seed` serves all batches in order (reproducible for the same seed, batch and
    device). `Generation.nfe` is the largest number of network passes any batch made (MDLM's cache and AR's
    early stop make it data dependent).
    """
    from elf.families import network_family
    from elf.families.ar import ar_sample
    from elf.families.mdlm import mdlm_sample
    from elf.vocab import PAD_ID

    family = network_family(network)
    if cfg.family != family:
        raise ElfError(f"sampler kind {cfg.kind!r} samples {cfg.family} models, not this {family} model")
    if batch < 1:
        raise ElfError(f"sampler.batch_size: must be >= 1, got {batch}")
    if num_samples is None:
        num_samples = len(source_ids) if source_ids is not None else batch
    generator = torch.Generator(device).manual_seed(seed)
    outputs, nfe = [], 0
    began = time.perf_counter()
    for first in range(0, num_samples, batch):
        rows = slice(first, min(first + batch, num_samples))
        n = rows.stop - rows.start
        src = None if source_ids is None else source_ids[rows].to(device)
        mask = None if source_mask is None else source_mask[rows].to(device=device, dtype=torch.bool)
        if family == "mdlm":
            ids, calls = mdlm_sample(network, (n, length), cfg.steps, generator, src, mask)
        else:
            ids, calls = ar_sample(network, (n, length), generator, cfg.kind == "ar_greedy", src, mask)
        if mask is not None:
            ids = ids.masked_fill(mask, PAD_ID)
        outputs.append(ids.cpu())
        nfe = max(nfe, calls)
    return Generation(torch.cat(outputs), nfe, time.perf_counter() - began)
