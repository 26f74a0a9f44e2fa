"""Training throughput and model-FLOPs utilisation (MFU) of the real training step on this machine.

    python -m bench.train_throughput                      # CPU: `small` (6 × 384), fp32, AdamW
    python -m bench.train_throughput --optimizer muon     # the paper's optimiser (torch Muon: bf16 Newton–Schulz)

Times `elf.step.TrainStep`, the very step `elf train` runs (per-row noise draws, the objective, backward, grad
clip, optimiser, lr schedule, EMA), on a synthetic batch, with the thread count of `threads` (default: the
physical cores). MFU = FLOPs / step time / measured dense matmul peak in the same run, for the method's FLOPs
and the FLOPs actually run (bench/flops.py). For GPUs use bench/gpu_check.py.
"""

import argparse
import json
import time

import torch

from bench.flops import matmul_peak, step_flops
from bench.gpu_check import DECODE_SHARE, OWT_TOKENS_PER_EPOCH, SELF_COND_SHARE, synthetic_batch
from elf.distributed import Dist
from elf.flow import ObjectiveConfig
from elf.model import build_model, num_parameters
from elf.optim import EMA, build_optimizer, warmup_constant_schedule
from elf.runtime import set_threads
from elf.step import TrainStep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--optimizer", default="adamw", help="adamw | muon (torch Muon runs bf16 Newton-Schulz)")
    parser.add_argument("--threads", type=int, default=None, help="default: elf.runtime.default_threads()")
    parser.add_argument("--model", type=json.loads, default={}, help='shape changes, e.g. \'{"depth": 2}\'')
    args = parser.parse_args()
    threads = set_threads(args.threads)
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(args.preset, args.embed_dim, args.vocab, **args.model)
    optimizer = build_optimizer(model, kind=args.optimizer, lr=1e-3)
    step = TrainStep(model, optimizer, warmup_constant_schedule(optimizer, 10), EMA(model, 0.9999), ObjectiveConfig(),
                     seed=0, d=Dist(0, 1, device), local_batch=args.batch, micro_batch=args.batch, grad_clip=1.0)
    batch = synthetic_batch(args.batch, args.length, args.embed_dim, args.vocab, device)
    step(batch, 0)  # warm-up
    began = time.perf_counter()
    for i in range(args.steps):
        float(step(batch, 1 + i)["loss"])
    seconds = (time.perf_counter() - began) / args.steps
    peak = matmul_peak(device, torch.float32)
    decode = DECODE_SHARE * args.batch
    method, executed = step_flops(model, args.batch, args.length, args.batch - decode, decode,
                                  (args.batch - decode) * SELF_COND_SHARE)
    tokens_per_s = args.batch * args.length / seconds
    print(json.dumps({
        "preset": args.preset, "model": args.model, "parameters": num_parameters(model), "threads": threads,
        "batch": args.batch, "length": args.length, "optimizer": args.optimizer,
        "seconds_per_step": round(seconds, 4), "tokens_per_s": round(tokens_per_s),
        "matmul_peak_tflops": round(peak / 1e12, 4),
        "mfu_method_flops": round(method / seconds / peak, 3),
        "mfu_executed_flops": round(executed / seconds / peak, 3),
        "projected_hours_per_owt_epoch_8_devices": round(OWT_TOKENS_PER_EPOCH / (tokens_per_s * 8) / 3600, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
