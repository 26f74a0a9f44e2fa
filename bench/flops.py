"""FLOPs of the ELF objective, for MFU figures (bench/train_throughput.py, bench/gpu_check.py).

Forward FLOPs are counted from the matmuls: 2 · in · out per token per Linear, attention 4 · T² · H per row and
layer (T = L + 12 prefix tokens), the decode head only on the rows that decode. One training step (elf-method §4,
§6): the gradient pass over every row costs a forward and a backward (≈ 2 forwards); a denoise row adds the
no-grad passes A and B. The method runs them on every denoise row; `elf_loss` runs them only on the rows that
self-condition (m = 1): the same update with fewer FLOPs. Both counts are returned.
"""

from __future__ import annotations

import time

import torch

#: Dense bf16 tensor-core peaks (no sparsity) from the datasheets, FLOP/s, matched in this order against the
#: device name (the SXM parts report no form factor: "NVIDIA H100 80GB HBM3").
NOMINAL_BF16_PEAK = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H200": 989e12, "H100": 989e12,
                     "A100": 312e12}


def forward_flops(model, rows: int, length: int, decode_rows: int) -> float:
    """Matmul FLOPs of one forward over `rows` rows of `length` tokens, the decode head on `decode_rows`."""
    cfg = model.cfg
    tokens = length + cfg.num_prefix
    body = sum(2 * m.in_features * m.out_features for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
    per_row = body * tokens + cfg.depth * 4 * tokens * tokens * cfg.hidden
    proj = sum(2 * m.in_features * m.out_features for m in model.input_proj.modules()
               if isinstance(m, torch.nn.Linear)) * length
    x_head = 2 * cfg.hidden * cfg.embed_dim * length
    decode = sum(2 * m.in_features * m.out_features for m in model.decode_head.modules()
                 if isinstance(m, torch.nn.Linear)) * length
    return rows * (per_row + proj + x_head) + decode_rows * decode


def step_flops(model, rows: int, length: int, denoise_rows: int, decode_rows: int,
               self_cond_rows: int) -> tuple[float, float]:
    """(method FLOPs, executed FLOPs) of one training step over `rows` rows."""
    gradient_pass = 3 * forward_flops(model, rows, length, decode_rows)
    one_row = forward_flops(model, 1, length, 0)
    return gradient_pass + 2 * one_row * denoise_rows, gradient_pass + 2 * one_row * self_cond_rows


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Measured dense matmul FLOP/s of this device and dtype: best of `repeats` timings of a batch of products
    (8192² × 20 on GPUs, so that launch and sync costs vanish; 2048² × 2 on CPUs)."""
    size, count = (8192, 20) if device.type == "cuda" else (2048, 2)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up (kernel selection)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(count):
            a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * count / best


def nominal_peak(device: torch.device) -> float | None:
    """The datasheet bf16 peak of this GPU, when it is one of `NOMINAL_BF16_PEAK`."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in NOMINAL_BF16_PEAK.items() if key in name), None)
