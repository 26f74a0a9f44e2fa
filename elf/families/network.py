"""The network of the token-space baselines (MDLM, AR): ELF's transformer blocks between a token embedding and a
linear head over the vocabulary.

    logits = TokenTransformer(cfg)(ids [B, L] long, t [B] | None)   # [B, L, V] fp32

Shared with ELF (elf/model.py): the pre-norm block (RMSNorm, qk-norm attention, SwiGLU), RoPE on content
positions, Xavier init, fp32 input/output layers under bf16 autocast. Different: the input is a token
embedding of V + 1 rows (row V is MDLM's [MASK]; the AR model never feeds it), the output is one RMSNorm and a
Linear H → V. Time enters MDLM the way it enters ELF: 4 in-context prefix tokens plus a sinusoidal embedding of t
(elf-method §5), not adaLN; `time_conditioning: false` drops them (MDLM's default). The AR network has no prefix
and a causal attention mask.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from elf.model import Block, ScalarEmbedder, _fp32_region, check_shape, config_from_dict, init_dense_layers, rope_angles


@dataclass
class TokenModelConfig:
    """Every shape of a baseline network; `mlp_hidden` None = int(4·H·2/3), as ELF."""

    family: str  # "mdlm" (bidirectional, time tokens) | "ar" (causal, no prefix)
    vocab_size: int  # V output classes; the input table has V + 1 rows (mask id = V)
    hidden: int = 768
    depth: int = 12
    heads: int = 12
    mlp_hidden: int | None = None
    num_prefix_each: int = 4  # MDLM's time tokens (ELF has 4 each of time, guidance, mode)
    # MDLM: t enters as time tokens (as ELF's) or not at all (MDLM's own default; only then is the sampler's cache
    # exact, elf/families/mdlm.py). AR has no time.
    time_conditioning: bool = True
    rope_theta: float = 1e4
    freq_dim: int = 256
    max_period: float = 1e4
    norm_eps: float = 1e-6
    attention_fp32: bool = False

    def __post_init__(self) -> None:
        if self.family not in ("mdlm", "ar"):
            raise ValueError(f"TokenModelConfig.family must be mdlm or ar, got {self.family!r}")
        if self.mlp_hidden is None:
            self.mlp_hidden = int(4 * self.hidden * 2 / 3)
        check_shape(self.to_dict())

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def causal(self) -> bool:
        return self.family == "ar"

    @property
    def num_prefix(self) -> int:
        return self.num_prefix_each if self.family == "mdlm" and self.time_conditioning else 0

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TokenModelConfig:
        return config_from_dict(cls, data)


class TokenTransformer(nn.Module):
    """[B, L] ids (and t for MDLM) → [B, L, V] logits (fp32). See the module docstring."""

    def __init__(self, cfg: TokenModelConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        self.token_embed = nn.Embedding(cfg.vocab_size + 1, h)
        if cfg.num_prefix:
            self.time_tokens = nn.Parameter(torch.empty(cfg.num_prefix, h))
            self.time_embed = ScalarEmbedder(h, cfg.freq_dim, cfg.max_period)
        self.blocks = nn.ModuleList(Block(cfg, causal=cfg.causal) for _ in range(cfg.depth))
        self.norm = nn.RMSNorm(h, eps=cfg.norm_eps)
        self.head = nn.Linear(h, cfg.vocab_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """ELF's init (Xavier dense kernels, zero biases, N(0, 0.02) tokens and φ MLP); N(0, 0.02) token table."""
        init_dense_layers(self)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        if self.cfg.num_prefix:
            nn.init.normal_(self.time_tokens, std=0.02)
            for layer in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
                nn.init.normal_(layer.weight, std=0.02)

    def forward(self, ids: Tensor, t: Tensor | None = None) -> Tensor:
        """ids [B, L] long (MDLM: the mask id V where masked); t [B] in [0, 1] (MDLM only). → logits [B, L, V]."""
        b, length = ids.shape
        with _fp32_region(ids.device):
            x = self.token_embed(ids)
            if self.cfg.num_prefix:  # a time-conditioned MDLM
                if t is None:
                    raise ValueError("the time-conditioned MDLM network needs the time t of its input")
                prefix = self.time_tokens + self.time_embed(t.float().expand(b))[:, None]
                x = torch.cat([prefix, x], dim=1)
        cos, sin = rope_angles(length, self.cfg.head_dim, self.cfg.rope_theta, ids.device)
        for block in self.blocks:
            x = block(x, cos, sin, self.cfg.num_prefix)
        with _fp32_region(ids.device):
            return self.head(self.norm(x[:, self.cfg.num_prefix:].float()))
