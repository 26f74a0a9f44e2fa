"""The ELF network (elf-method.md §5): a pre-norm, bidirectional transformer with in-context conditioning.

One network serves both jobs of the method: in *denoise* mode it predicts the clean embeddings x̂ from a
noisy state z_t (§3), in *decode* mode (the last step, §4) it maps embeddings to token logits. The mode, the
time t and the self-conditioning guidance scale w enter as 12 prefix tokens, not through adaLN.

Sections: config / embedders / rotary embedding / transformer block / model / presets.

Precision (§8, "bf16 autocast with the input/output projections and heads in fp32"): the trainer wraps the
forward in `torch.autocast(dtype=torch.bfloat16)`; this module switches autocast *off* around the input
projection, the t/w embedders, the x̂ head and the decode head (inputs cast to fp32), so only the transformer
blocks run in bf16. The residual stream stays fp32 (fp32 + bf16 promotes to fp32). Attention runs as bf16
SDPA (fp32 softmax accumulation inside the kernel) unless `ModelConfig.attention_fp32` asks for fp32 q/k/v.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Every shape of the network. `None` fields are derived in `__post_init__` (and then stored)."""

    embed_dim: int = 512  # d: width of the frozen encoder's embeddings (512 for T5-small)
    vocab_size: int = 32100  # V: rows of the decode head (len(tokenizer))
    hidden: int = 768  # H
    depth: int = 12
    heads: int = 12
    bottleneck: int | None = None  # default min(128, d // 2): 128 for d = 512, 64 for a d = 128 scratch encoder
    decode_hidden: int | None = None  # default d (§4: W₁ is H×512 for T5-small)
    mlp_hidden: int | None = None  # default int(4·H·2/3) (2048 for H = 768)
    num_prefix_each: int = 4  # 4 time + 4 guidance + 4 mode tokens
    rope_theta: float = 1e4
    freq_dim: int = 256  # sinusoidal features of t and w (half cos, half sin)
    max_period: float = 1e4
    norm_eps: float = 1e-6
    # True: q, k, v in fp32 under autocast (the parity path). False (default): bf16 SDPA on GPUs, whose flash /
    # cuDNN kernels accumulate the softmax in fp32, which is what §5 asks; on CPUs without autocast both are fp32.
    attention_fp32: bool = False

    def __post_init__(self) -> None:
        if self.bottleneck is None:
            self.bottleneck = min(128, self.embed_dim // 2)
        if self.decode_hidden is None:
            self.decode_hidden = self.embed_dim
        if self.mlp_hidden is None:
            self.mlp_hidden = int(4 * self.hidden * 2 / 3)
        if not 0 < self.bottleneck < self.embed_dim:
            raise ValueError(f"bottleneck must be in (0, embed_dim={self.embed_dim}), got {self.bottleneck}")
        check_shape(self.to_dict())

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def num_prefix(self) -> int:
        return 3 * self.num_prefix_each

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        return config_from_dict(cls, data)


def config_from_dict(cls: type, data: dict):
    """A network config dataclass from a config.json dict; a misspelt key is an error, never silently ignored."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")
    return cls(**data)


def check_shape(shape: dict) -> None:
    """The shape rules that do not depend on the encoder (§5); `ValueError` names the offending field.

    Shared by `ModelConfig` and the config loader, so `elf config check` rejects what training would.
    """
    hidden, heads, freq_dim = shape["hidden"], shape["heads"], shape.get("freq_dim", 256)
    if hidden % heads:
        raise ValueError(f"hidden={hidden} is not divisible by heads={heads}")
    if (hidden // heads) % 2:
        raise ValueError(f"head dim {hidden // heads} (hidden / heads) must be even for interleaved-pair RoPE")
    if freq_dim % 2:
        raise ValueError(f"freq_dim must be even, got {freq_dim}")


def _fp32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off: the projections and heads that §8 keeps in fp32."""
    return torch.autocast(device_type=device.type, enabled=False)


# ---------------------------------------------------------------------------------------------------------
# Embedders (§5): input projection with bottleneck, sinusoidal scalar embedders for t and w
# ---------------------------------------------------------------------------------------------------------


def sinusoidal_features(value: Tensor, dim: int = 256, max_period: float = 1e4) -> Tensor:
    """DiT's timestep features of the *raw* value (no ×1000): [cos(v·f_i), sin(v·f_i)], f_i = P^(−i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=value.device) / half)
    args = value.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ScalarEmbedder(nn.Module):
    """φ(·): sinusoidal features → Linear(freq_dim, H) → SiLU → Linear(H, H); used for t and for w."""

    def __init__(self, hidden: int, freq_dim: int, max_period: float):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, value: Tensor) -> Tensor:
        return self.mlp(sinusoidal_features(value, self.freq_dim, self.max_period))


class InputProjection(nn.Module):
    """u = [z, c] (2d) → Linear 2d→d (+bias) → Linear d→bottleneck (no bias) → Linear bottleneck→H (+bias)."""

    def __init__(self, embed_dim: int, bottleneck: int, hidden: int):
        super().__init__()
        self.merge = nn.Linear(2 * embed_dim, embed_dim)
        self.down = nn.Linear(embed_dim, bottleneck, bias=False)
        self.up = nn.Linear(bottleneck, hidden)

    def forward(self, z: Tensor, self_cond: Tensor) -> Tensor:
        return self.up(self.down(self.merge(torch.cat([z, self_cond], dim=-1))))


# ---------------------------------------------------------------------------------------------------------
# Rotary position embedding (§5): 1-D, θ = 1e4, interleaved pairs (0,1), (2,3), ...; content tokens only
# ---------------------------------------------------------------------------------------------------------


def rope_angles(length: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos, sin of shape [length, head_dim // 2]: pair i at position p turns by p·θ^(−2i/head_dim)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq[None]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each interleaved pair (x[2i], x[2i+1]) of x [..., L, head_dim] by the angles of its position."""
    pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def apply_rope_to_content(x: Tensor, cos: Tensor, sin: Tensor, num_prefix: int) -> Tensor:
    """RoPE on positions num_prefix.. (content 0..L−1); the prefix tokens stay unrotated (§5)."""
    return torch.cat([x[..., :num_prefix, :], apply_rope(x[..., num_prefix:, :], cos, sin)], dim=-2)


# ---------------------------------------------------------------------------------------------------------
# Transformer block (§5): x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x))
# ---------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Fused qkv (bias) → per-head RMSNorm on q, k → RoPE on content → SDPA → out Linear (bias).

    ELF attends bidirectionally (no mask). `causal` (the autoregressive baseline, elf/families/ar.py) masks
    every key after the query; it is used with no prefix tokens, so position i sees content 0..i.

    fp32 softmax: with `attention_fp32`, q/k/v are cast to fp32 and `scaled_dot_product_attention` runs with
    autocast disabled (autocast would otherwise cast its inputs back to bf16), so scores, softmax and the
    weighted sum are fp32. The result is cast back to v's autocast dtype before the out projection.
    """

    def __init__(self, cfg: ModelConfig, causal: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.fp32, self.causal = cfg.heads, cfg.head_dim, cfg.attention_fp32, causal
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, num_prefix: int) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out_dtype = v.dtype
        if self.fp32:
            q, k, v = q.float(), k.float(), v.float()
        q = apply_rope_to_content(self.q_norm(q.to(self.q_norm.weight.dtype)), cos, sin, num_prefix)
        k = apply_rope_to_content(self.k_norm(k.to(self.k_norm.weight.dtype)), cos, sin, num_prefix)
        q, k = q.to(v.dtype), k.to(v.dtype)
        ctx = _fp32_region(x.device) if self.fp32 else contextlib.nullcontext()
        with ctx:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.to(out_dtype).transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class SwiGLU(nn.Module):
    """down(SiLU(gate(x)) · up(x)), biases on, hidden int(4·H·2/3)."""

    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__()
        self.gate = nn.Linear(hidden, mlp_hidden)
        self.up = nn.Linear(hidden, mlp_hidden)
        self.down = nn.Linear(mlp_hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, causal: bool = False):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.attn = Attention(cfg, causal)
        self.norm2 = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.hidden, cfg.mlp_hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, num_prefix: int) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, num_prefix)
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------------------------------------
# Output heads (§4, §5)
# ---------------------------------------------------------------------------------------------------------


class XHead(nn.Module):
    """x̂ = Linear_{H→d}(RMSNorm(h)); weight and bias zero-initialised (in `ELF.reset_parameters`)."""

    def __init__(self, hidden: int, embed_dim: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(hidden, eps=eps)
        self.linear = nn.Linear(hidden, embed_dim)

    def forward(self, h: Tensor) -> Tensor:
        return self.linear(self.norm(h))


class DecodeHead(nn.Module):
    """logits = W₂·GELU_tanh(W₁·h + b₁) + b₂ on the last block's h (before the x̂ norm); untied, Xavier."""

    def __init__(self, hidden: int, decode_hidden: int, vocab_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, decode_hidden)
        self.fc2 = nn.Linear(decode_hidden, vocab_size)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def init_dense_layers(network: nn.Module) -> None:
    """§5: every Linear Xavier-uniform with zero bias, every RMSNorm scale 1 (shared with the baselines)."""
    for module in network.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)


class ELF(nn.Module):
    """x̂, logits = ELF(z, self_cond, t, w, decode_mask). Prefix layout: [4 time | 4 guidance | 4 mode | L content]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, k = cfg.hidden, cfg.num_prefix_each
        self.input_proj = InputProjection(cfg.embed_dim, cfg.bottleneck, h)
        self.time_tokens = nn.Parameter(torch.empty(k, h))
        self.guidance_tokens = nn.Parameter(torch.empty(k, h))
        self.mode_tokens = nn.Parameter(torch.empty(k, h))
        self.time_embed = ScalarEmbedder(h, cfg.freq_dim, cfg.max_period)
        self.guidance_embed = ScalarEmbedder(h, cfg.freq_dim, cfg.max_period)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.x_head = XHead(h, cfg.embed_dim, cfg.norm_eps)
        self.decode_head = DecodeHead(h, cfg.decode_hidden, cfg.vocab_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """§5 init: Xavier-uniform dense kernels, zero biases; N(0, 0.02) tokens and φ MLPs; zero x̂ head."""
        init_dense_layers(self)
        for tokens in (self.time_tokens, self.guidance_tokens, self.mode_tokens):
            nn.init.normal_(tokens, std=0.02)
        for embedder in (self.time_embed, self.guidance_embed):
            for layer in (embedder.mlp[0], embedder.mlp[2]):
                nn.init.normal_(layer.weight, std=0.02)  # as DiT's TimestepEmbedder; biases stay 0
        # Zero-init output layer: x̂ = 0 at initialisation.
        nn.init.zeros_(self.x_head.linear.weight)
        nn.init.zeros_(self.x_head.linear.bias)

    def forward(
        self,
        z: Tensor,
        self_cond: Tensor,
        t: Tensor,
        w: Tensor,
        decode_mask: Tensor,
        return_logits: bool | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """z, self_cond [B, L, d]; t, w [B] (0-dim broadcasts); decode_mask [B] bool.

        Returns x̂ [B, L, d] (fp32) and the logits of the *decode rows only*, [n_decode, L, V] in batch order
        (= [B, L, V] when every row decodes, as in sampling). Only those rows go through the V-sized head:
        the loss needs logits of decode rows alone, and at V = 32,100 the head costs more than x̂.
        return_logits: None → compute iff some row decodes; False → never (None); True → always.
        """
        b, length, _ = z.shape
        t, w, decode_mask = t.expand(b), w.expand(b), decode_mask.to(torch.bool).expand(b)
        with _fp32_region(z.device):
            h = self.input_proj(z.float(), self_cond.float())
            prefix = torch.cat(
                [
                    self.time_tokens + self.time_embed(t)[:, None],
                    self.guidance_tokens + self.guidance_embed(w)[:, None],
                    self.mode_tokens * decode_mask.float()[:, None, None],  # gate 1 decode, 0 denoise
                ],
                dim=1,
            )
            x = torch.cat([prefix, h], dim=1)
        cos, sin = rope_angles(length, self.cfg.head_dim, self.cfg.rope_theta, z.device)
        for block in self.blocks:
            x = block(x, cos, sin, self.cfg.num_prefix)
        h = x[:, self.cfg.num_prefix :]  # drop the prefix positions
        with _fp32_region(z.device):
            h = h.float()
            x_hat = self.x_head(h)
            want = bool(decode_mask.any()) if return_logits is None else return_logits
            logits = self.decode_head(h[decode_mask]) if want else None
        return x_hat, logits


def num_parameters(model: nn.Module) -> int:
    """All parameters of the ELF network (the frozen encoder is not part of it)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# Presets (§5 table; `tiny` is the CPU demo size)
# ---------------------------------------------------------------------------------------------------------

PRESETS: dict[str, dict] = {
    "tiny": {"depth": 3, "hidden": 192, "heads": 4},
    "small": {"depth": 6, "hidden": 384, "heads": 6},
    "ELF-B": {"depth": 12, "hidden": 768, "heads": 12},  # 105M params at d = 512, V = 32,100
    "ELF-M": {"depth": 24, "hidden": 1056, "heads": 16},  # 342M
    "ELF-L": {"depth": 32, "hidden": 1280, "heads": 16},  # 652M
}


def model_config(preset: str, embed_dim: int, vocab_size: int, **overrides) -> ModelConfig:
    """The ModelConfig of a named preset, with any field overridden by keyword."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known presets: {sorted(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[preset], "embed_dim": embed_dim, "vocab_size": vocab_size, **overrides})


def build_model(preset: str, embed_dim: int, vocab_size: int, **overrides) -> ELF:
    """ELF of a named preset for an encoder of width `embed_dim` and a vocabulary of `vocab_size`."""
    return ELF(model_config(preset, embed_dim, vocab_size, **overrides))


# ---------------------------------------------------------------------------------------------------------
# Saved models: a directory with config.json + model.safetensors that `load_model(path)` rebuilds
# ---------------------------------------------------------------------------------------------------------

MODEL_CONFIG_FILE = "config.json"
MODEL_WEIGHTS_FILE = "model.safetensors"


MODEL_TYPE = "elf"


def save_model(model: nn.Module, directory: str | Path, metadata: dict | None = None) -> None:
    """Write the weights and config.json (the network's family and config, the weights' sha256, plus `metadata`:
    dataset, encoder hash, …) to `directory`. `config.json` carries Hugging Face's `model_type` / `architectures`.
    `model`: an ELF or a baseline network (elf/families)."""
    from safetensors.torch import save_file

    from elf.hashing import file_sha256

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / MODEL_WEIGHTS_FILE
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(weights))
    family = getattr(model.cfg, "family", "elf")  # written for the baselines only: ELF's config stays as it was
    config = {"model_type": MODEL_TYPE, "architectures": [type(model).__name__], **(metadata or {}),
              **({"family": family} if family != "elf" else {}), "model": model.cfg.to_dict(),
              "weights_sha256": file_sha256(weights)}
    (directory / MODEL_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _network_class(family: str) -> tuple[type, type]:
    """(network class, config class) of a saved model's family ("elf" for models saved before families)."""
    if family == "elf":
        return ELF, ModelConfig
    from elf.families.network import TokenModelConfig, TokenTransformer

    if family not in ("mdlm", "ar"):
        raise ValueError(f"unknown model family {family!r}")
    return TokenTransformer, TokenModelConfig


def _state_bytes(network_class: type, cfg) -> int:
    """Bytes of the weights a config asks for, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        probe = network_class(cfg)
    return sum(t.numel() * t.element_size() for t in probe.state_dict().values())


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a saved model (ELF, or a baseline of elf/families) in eval mode; returns it with the config's
    metadata. Errors name the file."""
    from safetensors.torch import load_file

    from elf.errors import ElfError
    from elf.hashing import file_sha256

    directory = Path(directory)
    config_path, weights_path = directory / MODEL_CONFIG_FILE, directory / MODEL_WEIGHTS_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        network_class, config_class = _network_class(config.get("family", "elf"))
        cfg = config_class.from_dict(config["model"])
        expected_sha256 = config["weights_sha256"]
    except FileNotFoundError:
        raise ElfError(f"{config_path}: not found (is {directory} a trained ELF model directory?)") from None
    except KeyError as error:
        raise ElfError(f"{config_path}: not a valid ELF model config (no {error}; a model saved by an older "
                       "version: rerun its train stage, which resumes from the last checkpoint)") from None
    except (ValueError, TypeError) as error:
        raise ElfError(f"{config_path}: not a valid ELF model config ({error})") from None
    if not weights_path.is_file():
        raise ElfError(f"{weights_path}: not found")
    # The config must not make us allocate more than the weights file holds (a hostile or broken config.json),
    # and the weights must be the ones saved with it.
    wanted, held = _state_bytes(network_class, cfg), weights_path.stat().st_size
    if wanted > held:
        raise ElfError(f"{config_path}: asks for {wanted / 2**20:,.1f} MiB of weights but {weights_path} holds "
                       f"{held / 2**20:,.1f} MiB")
    if file_sha256(weights_path) != expected_sha256:
        raise ElfError(f"{weights_path}: sha256 does not match {config_path} (corrupt, or not the weights saved "
                       "with this config)")
    model = network_class(cfg)
    try:
        model.load_state_dict(load_file(str(weights_path), device=str(device)))
    except Exception as error:  # noqa: BLE001 - safetensors and load_state_dict raise several types
        raise ElfError(f"{weights_path}: cannot load weights ({str(error).splitlines()[0]})") from None
    return model.to(device).eval(), {k: v for k, v in config.items() if k != "model"}
