"""Baseline model families trained and evaluated by the same pipeline as ELF (`train.*.family`).

- `elf`  — the continuous flow in embedding space (elf/model.py, elf/flow.py, elf/sample.py);
- `mdlm` — masked (absorbing-state) discrete diffusion, Sahoo et al. 2024 (elf/families/mdlm.py);
- `ar`   — a left-to-right language model with teacher forcing (elf/families/ar.py).

The baselines share ELF's tokenizer, token shards, transformer blocks (elf/model.py `Block`), optimiser, EMA,
checkpoints, DDP, MLflow and evaluation; only the network's input/output layers, the objective and the sampler
differ. Their network is `elf.families.network.TokenTransformer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a network is built: `elf --help` stays quick
    from torch import Tensor, nn

FAMILIES = ("elf", "mdlm", "ar")

#: The family of model each sampler kind samples: ELF's ODE/SDE (elf/sample.py), MDLM's ancestral updates
#: (`steps` of them), AR's ancestral or greedy left-to-right decoding (one pass per token; `steps` unused).
SAMPLER_FAMILY = {"ode": "elf", "sde": "elf", "mdlm": "mdlm", "ar": "ar", "ar_greedy": "ar"}

#: The ModelSettings fields that only ELF has (its input projection and decode head): a baseline ignores them.
ELF_ONLY_FIELDS = ("bottleneck", "decode_hidden")
#: The ModelSettings fields that only the baselines have (MDLM's time tokens): ELF ignores them.
BASELINE_ONLY_FIELDS = ("time_conditioning",)


def build_network(family: str, preset: str, embed_dim: int, vocab_size: int, **overrides) -> nn.Module:
    """The network of `family` in a named size (elf/model.py PRESETS) with `overrides` of its shape.

    ELF: `build_model`. MDLM / AR: a `TokenTransformer` with the preset's depth, width and heads, so the three
    families share one backbone. Fields of the other kind (`ELF_ONLY_FIELDS`, `BASELINE_ONLY_FIELDS`) are dropped.
    `embed_dim` is ELF's encoder width (unused by the baselines).
    """
    from elf.model import PRESETS, build_model

    if family == "elf":
        return build_model(preset, embed_dim, vocab_size,
                           **{k: v for k, v in overrides.items() if k not in BASELINE_ONLY_FIELDS})
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known presets: {sorted(PRESETS)}")
    from elf.families.network import TokenModelConfig, TokenTransformer

    shape = {k: v for k, v in {**PRESETS[preset], **overrides}.items() if k not in ELF_ONLY_FIELDS}
    return TokenTransformer(TokenModelConfig(family=family, vocab_size=vocab_size, **shape))


def network_family(network: nn.Module) -> str:
    """"elf", "mdlm" or "ar": the family a built network belongs to."""
    return getattr(network.cfg, "family", "elf")


def baseline_loss(family: str, network, batch: dict[str, Tensor], seeds: list[int],
                  mask_id: int) -> tuple[Tensor, dict]:
    """The training loss of a baseline on one micro-batch (the loader's dict), its draws keyed per row by
    `seeds` like ELF's; `network` may be wrapped (DDP, torch.compile), hence `mask_id` (its vocab size V).
    Returns (loss per loss token, the statistics ELF's loss returns)."""
    from elf.families.ar import ar_loss
    from elf.families.mdlm import draw_mask_per_row, mdlm_loss

    ids, loss_mask, source_mask = batch["input_ids"], batch["loss_mask"], batch["source_mask"]
    if family == "mdlm":
        draws = draw_mask_per_row(seeds, ids.shape[1], ids.device)
        return mdlm_loss(network, ids, loss_mask, source_mask, draws, mask_id)
    return ar_loss(network, ids, loss_mask, source_mask)

