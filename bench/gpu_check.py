"""GPU check: ELF-B training speed, MFU, memory and sampling speed on one CUDA GPU, in under 5 minutes.

    python -m bench.gpu_check                          # from the repository root, on a machine with a GPU
    python -m bench.gpu_check --tiny --device cpu      # the seconds-long CPU run the tests make

Needs torch alone (and this repository on the path): it imports the model, the objective and the trainer's own
step (elf/step.py: noise draws, micro-batches, clip, optimiser, EMA), not the data or tracking stack.

Prints JSON:
- train, for torch.compile off and on: seconds per step, tokens/s, MFU against the GPU's datasheet bf16 peak
  and against a measured bf16 matmul, counting the method's FLOPs (gradient pass + passes A and B on every
  denoise row) and the FLOPs actually run (A and B only on the self-conditioning rows), at the expected row
  mix (20% decode rows, half the denoise rows self-conditioning); peak memory; the projected hours per
  OpenWebText epoch (≈ 9B tokens) on 8 GPUs, assuming linear scaling;
- sampling: 32-step SDE (γ 1.5, w 3) at L 1024 and batch 64, samples/s with the decode pass;
- ddp: the same training measurement with 2 processes through torchrun (compile as for one) when two GPUs
  exist (else why it was skipped).
Each part is printed as one JSON line when it finishes, then the whole report.
Goals (issue): MFU ≥ 0.4 at ELF-B; ≤ 3 h per epoch on 8 × H200 (the authors' PyTorch port: ≈ 4 h).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from bench.flops import matmul_peak, nominal_peak, step_flops, synchronize
from elf.distributed import Dist, init_distributed, shutdown
from elf.flow import ObjectiveConfig
from elf.model import build_model, num_parameters
from elf.optim import EMA, build_optimizer, warmup_constant_schedule
from elf.runtime import configure_device
from elf.sample import SamplerConfig, generate
from elf.step import TrainStep

OWT_TOKENS_PER_EPOCH = 9.0e9  # ≈ 45B tokens / 5 epochs (elf-method §8)
DECODE_SHARE, SELF_COND_SHARE = 0.2, 0.5  # elf-method §4, §6


def synthetic_batch(rows: int, length: int, dim: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A batch shaped like the loader's (unconditional rows, every token valid)."""
    g = torch.Generator().manual_seed(0)
    full = torch.ones(rows, length, dtype=torch.bool)
    batch = {"x": torch.randn(rows, length, dim, generator=g), "loss_mask": full, "valid_mask": full,
             "source_mask": torch.zeros_like(full), "cond_dropped": torch.zeros(rows, dtype=torch.bool),
             "input_ids": torch.randint(3, vocab, (rows, length), generator=g)}
    return {k: v.to(device) for k, v in batch.items()}


def build(args, d: Dist, compile: bool):
    torch.manual_seed(0)
    model = build_model(args.preset, args.embed_dim, args.vocab, **args.model).to(d.device)
    optimizer = build_optimizer(model, kind=args.optimizer, lr=1e-3)
    step = TrainStep(model, optimizer, warmup_constant_schedule(optimizer, 10), EMA(model, 0.9999), ObjectiveConfig(),
                     seed=0, d=d, local_batch=args.batch, micro_batch=args.batch, grad_clip=1.0, compile=compile)
    return model, step


def train_figures(args, d: Dist, compile: bool, peaks: dict[str, float | None]) -> dict:
    model, step = build(args, d, compile)
    batch = synthetic_batch(args.batch, args.length, args.embed_dim, args.vocab, d.device)
    began = time.perf_counter()
    for i in range(args.warmup):
        step(batch, i)
    synchronize(d.device)
    warmup_seconds = time.perf_counter() - began
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    began = time.perf_counter()
    for i in range(args.steps):
        stats = step(batch, args.warmup + i)
    synchronize(d.device)
    seconds = (time.perf_counter() - began) / args.steps
    decode = DECODE_SHARE * args.batch
    method, executed = step_flops(model, args.batch, args.length, args.batch - decode, decode,
                                  (args.batch - decode) * SELF_COND_SHARE)
    per_gpu = args.batch * args.length / seconds  # every process runs `args.batch` rows per step
    figures = {"compile": compile, "warmup_seconds": round(warmup_seconds, 1), "seconds_per_step": round(seconds, 4),
               "tokens_per_s_per_gpu": round(per_gpu), "tokens_per_s_total": round(per_gpu * d.world),
               "loss": round(float(stats["loss"]), 4)}
    for label, peak in peaks.items():
        if peak:
            figures[f"mfu_method_vs_{label}"] = round(method / seconds / peak, 3)
            figures[f"mfu_executed_vs_{label}"] = round(executed / seconds / peak, 3)
    if d.device.type == "cuda":
        figures["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(d.device) / 2**30, 1)
    figures["projected_hours_per_owt_epoch_8_gpus"] = round(OWT_TOKENS_PER_EPOCH / (8 * per_gpu) / 3600, 2)
    return figures


def sampling_figures(args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(args.preset, args.embed_dim, args.vocab, **args.model).to(device).eval()
    torch.nn.init.normal_(model.x_head.linear.weight, std=0.02)  # a non-zero x̂, as a trained model has
    cfg = SamplerConfig(kind="sde", steps=args.sample_steps, gamma=1.5, guidance=3.0)
    generate(model, args.embed_dim, args.length, args.sample_batch, cfg, 0, device, progress=False)  # warm-up
    out = generate(model, args.embed_dim, args.length, args.sample_batch, cfg, 1, device,
                   num_samples=2 * args.sample_batch, progress=False)
    return {"sampler": f"sde-{args.sample_steps}", "length": args.length, "batch": args.sample_batch,
            "samples_per_s": round(2 * args.sample_batch / out.seconds, 2), "network_evaluations": out.nfe}


def ddp_figures(args) -> dict:
    """One 2-process run of this script's training part through torchrun, when two GPUs exist."""
    if torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU(s): a 2-process DDP step needs 2"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "bench.gpu_check", "--ddp-worker", *sys.argv[1:]]
    try:
        out = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), timeout=240)
    except subprocess.TimeoutExpired:
        return {"failed": "no result within 240 s (an NCCL hang?)"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if out.returncode == 0 and lines else {"failed": out.stderr[-2000:]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="ELF-B")
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32100)
    parser.add_argument("--batch", type=int, default=64, help="rows per GPU (the paper: 512 over 8 GPUs)")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--optimizer", default="muon")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--sample-steps", type=int, default=32)
    parser.add_argument("--compile", choices=["both", "off", "on"], default="both")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (the tests' CPU check)")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = {}
    if args.tiny:
        args.preset, args.embed_dim, args.vocab, args.length = "tiny", 16, 64, 16
        args.model = {"depth": 1, "hidden": 32, "heads": 2, "bottleneck": 8}
        args.batch, args.sample_batch, args.sample_steps, args.warmup, args.steps = 4, 2, 4, 1, 2
        args.optimizer = "adamw"  # torch's Muon runs Newton-Schulz in bf16: slow on most CPUs
    return args


def main() -> None:
    args = parse_args()
    if args.ddp_worker:  # DDP as `elf train` runs it on GPUs: compile on unless the check was told otherwise
        d = init_distributed()
        configure_device(d.device)
        figures = train_figures(args, d, compile=args.compile != "off", peaks={"datasheet": nominal_peak(d.device)})
        if d.main:
            print(json.dumps({"processes": d.world, **figures}))
        shutdown(d)
        return
    device = torch.device(args.device)
    configure_device(device)
    d = Dist(0, 1, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peaks = {"datasheet": nominal_peak(device), "measured_matmul": matmul_peak(device, dtype)}
    modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.compile]
    with torch.device("meta"):  # the shape only: no weights on the GPU
        parameters = num_parameters(build_model(args.preset, args.embed_dim, args.vocab, **args.model))
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "preset": args.preset, "parameters": parameters,
        "batch_per_gpu": args.batch, "length": args.length, "optimizer": args.optimizer,
        "bf16_peak_tflops": {k: round(v / 1e12, 1) if v else None for k, v in peaks.items()},
    }
    # Each part is printed as it finishes (a check stopped at its time limit still reports what it measured),
    # then the whole report.
    parts = [("train", lambda: [train_figures(args, d, compile, peaks) for compile in modes]),
             ("sampling", lambda: sampling_figures(args, device)),
             ("ddp", lambda: ddp_figures(args) if device.type == "cuda" else {"skipped": "no GPU"})]
    for name, measure in parts:
        report[name] = measure()
        print(json.dumps({name: report[name]}), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
