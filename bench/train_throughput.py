"""Training throughput and model-FLOPs utilisation (MFU) of the ELF objective.

    python bench/train_throughput.py                       # CPU: `small` (6 × 384), fp32
    python bench/train_throughput.py --preset ELF-B --device cuda --bf16 --batch 64 --length 1024

MFU = (FLOPs the method needs per step) / step time / (dense matmul peak measured in the same run).
The method's FLOPs per step (elf-method §4, §6): a denoise row costs three forwards (passes A, B and the
gradient pass) and one backward (≈ two forwards); a decode row one forward and one backward. Our objective
runs passes A and B only on denoise rows that self-condition (m = 1, half of them): the same math with
fewer FLOPs, so the "executed" MFU is reported beside the method's. Forward FLOPs are counted from the
matmuls: 2 · in · out per token per Linear, attention 4 · T² · H per row and layer (T = L + 12 prefix
tokens), and the decode head only where it runs. Also prints projected hours per OpenWebText epoch.
"""

import argparse
import json
import time

import torch

from elf.flow import ObjectiveConfig, draw_noise, elf_loss
from elf.model import build_model, num_parameters
from elf.optim import build_optimizer

OWT_TOKENS_PER_EPOCH = 9.0e9  # ≈ 45B tokens / 5 epochs (elf-method §8)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Dense matmul FLOP/s of this device and dtype (best of `repeats`)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 2):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_flops(model, rows: int, length: int, decode_rows: int) -> float:
    """Matmul FLOPs of one forward over `rows` rows, with the decode head on `decode_rows` of them."""
    cfg = model.cfg
    tokens = length + cfg.num_prefix
    body = 0
    for module in model.blocks.modules():
        if isinstance(module, torch.nn.Linear):
            body += 2 * module.in_features * module.out_features
    per_row = body * tokens + cfg.depth * 4 * tokens * tokens * cfg.hidden
    proj = sum(2 * m.in_features * m.out_features for m in model.input_proj.modules()
               if isinstance(m, torch.nn.Linear)) * length
    x_head = 2 * cfg.hidden * cfg.embed_dim * length
    decode = sum(2 * m.in_features * m.out_features for m in model.decode_head.modules()
                 if isinstance(m, torch.nn.Linear)) * length
    return rows * (per_row + proj + x_head) + decode_rows * decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU), peak measured in bf16")
    parser.add_argument("--optimizer", default="adamw", help="adamw | muon (torch Muon runs bf16 Newton-Schulz)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.preset, args.embed_dim, args.vocab).to(device)
    optimizer = build_optimizer(model, kind=args.optimizer, lr=1e-3)
    cfg = ObjectiveConfig()
    x = torch.randn(args.batch, args.length, args.embed_dim, device=device)
    tokens = torch.randint(3, args.vocab, (args.batch, args.length), device=device)
    mask = torch.ones(args.batch, args.length, dtype=torch.bool, device=device)
    no_source = torch.zeros_like(mask)
    no_drop = torch.zeros(args.batch, dtype=torch.bool, device=device)
    generator = torch.Generator(device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def step() -> dict:
        draws = draw_noise(args.batch, args.length, args.embed_dim, cfg, generator)
        with autocast:
            loss, stats = elf_loss(model, x, mask, no_source, no_drop, tokens, cfg, draws=draws)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {k: int(v) for k, v in stats.items() if k.endswith("rows")}

    step()  # warm-up
    times, flops_method, flops_executed = [], 0.0, 0.0
    for _ in range(args.steps):
        _sync(device)
        start = time.perf_counter()
        rows = step()
        _sync(device)
        times.append(time.perf_counter() - start)
        den, dec, sc = rows["denoise_rows"], rows["decode_rows"], rows["self_cond_rows"]
        fwd_all = forward_flops(model, args.batch, args.length, dec)  # the gradient pass
        fwd_den = forward_flops(model, 1, args.length, 0)
        flops_method += 3 * fwd_all + 2 * fwd_den * den  # gradient pass + backward (2×), passes A and B
        flops_executed += 3 * fwd_all + 2 * fwd_den * sc
    seconds = sum(times)
    peak = matmul_peak(device, torch.bfloat16 if args.bf16 else torch.float32)
    tokens_per_s = args.batch * args.length * args.steps / seconds
    figures = {
        "preset": args.preset, "parameters": num_parameters(model), "device": str(device),
        "dtype": "bf16" if args.bf16 else "fp32", "threads": torch.get_num_threads(),
        "batch": args.batch, "length": args.length, "optimizer": args.optimizer,
        "seconds_per_step": round(seconds / args.steps, 4), "tokens_per_s": round(tokens_per_s),
        "matmul_peak_tflops": round(peak / 1e12, 4),
        "mfu_method_flops": round(flops_method / seconds / peak, 3),
        "mfu_executed_flops": round(flops_executed / seconds / peak, 3),
        "projected_hours_per_owt_epoch_8_devices": round(OWT_TOKENS_PER_EPOCH / (tokens_per_s * 8) / 3600, 1),
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
