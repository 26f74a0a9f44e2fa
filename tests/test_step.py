"""The training step shared by `elf train` and the benchmarks (elf/step.py), and the GPU check built on it."""

import json
import subprocess
import sys

import pytest
import torch

from elf.distributed import Dist
from elf.flow import ObjectiveConfig
from elf.model import build_model
from elf.optim import EMA, build_optimizer, warmup_constant_schedule
from elf.step import TrainStep
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(rows: int = 8, length: int = 16, dim: int = 16, vocab: int = 50) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    full = torch.ones(rows, length, dtype=torch.bool)
    source = torch.zeros_like(full)
    source[::2, :4] = True  # conditional rows too: the source path must compile as well
    return {"x": torch.randn(rows, length, dim, generator=g), "loss_mask": ~source, "valid_mask": full,
            "source_mask": source, "cond_dropped": torch.tensor([True, False] * (rows // 2)),
            "input_ids": torch.randint(3, vocab, (rows, length), generator=g)}


def train_step(compile: bool) -> TrainStep:
    torch.manual_seed(0)
    model = build_model("tiny", 16, 50, depth=1, hidden=32, heads=2, bottleneck=8)
    optimizer = build_optimizer(model, kind="adamw", lr=1e-3)
    return TrainStep(model, optimizer, warmup_constant_schedule(optimizer, 2), EMA(model, 0.9), ObjectiveConfig(),
                     seed=0, d=Dist(0, 1, torch.device("cpu")), local_batch=8, micro_batch=4, grad_clip=1.0,
                     compile=compile)


def test_statistics_stay_tensors_until_read():
    stats = train_step(compile=False)(batch(), 0)
    assert set(stats) == {"loss", "mse", "ce", "decode_acc", "grad_norm", "tokens"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values())
    assert float(stats["tokens"]) == 8 * 16


@pytest.mark.slow
def test_compiled_step_matches_the_eager_step():
    """`train.compile` (auto: on for CUDA) runs the same update; checked here with inductor on the CPU."""
    eager, compiled = train_step(compile=False), train_step(compile=True)
    for step in range(3):
        a, b = eager(batch(), step), compiled(batch(), step)
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
    for p, q in zip(eager.model.parameters(), compiled.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


BLOCKED = ["pydantic", "ruamel", "yaml", "pyarrow", "mlflow", "prefect", "dvc", "datasets", "sacrebleu"]


def test_gpu_check_runs_on_cpu_with_torch_alone():
    """The GPU machine may have torch and transformers only: the check must not import the pipeline's stack."""
    blocker = ("import sys\n"
               f"class Block:\n    names = {BLOCKED!r}\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in self.names:\n"
               "            raise ImportError(f'blocked: {name}')\n"
               "sys.meta_path.insert(0, Block())\n"
               "sys.argv = ['gpu_check', '--tiny', '--device', 'cpu', '--compile', 'off']\n"
               "import runpy\nrunpy.run_module('bench.gpu_check', run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", blocker], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    parts = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"')]
    assert [next(iter(part)) for part in parts] == ["train", "sampling", "ddp"]  # each part as it finishes
    report = json.loads(out.stdout[out.stdout.index("\n{\n") + 1:])
    train, = report["train"]
    assert train["tokens_per_s_per_gpu"] == train["tokens_per_s_total"] > 0
    assert train["mfu_method_vs_measured_matmul"] > train["mfu_executed_vs_measured_matmul"] > 0
    hours = 9.0e9 / (8 * train["tokens_per_s_per_gpu"]) / 3600
    assert train["projected_hours_per_owt_epoch_8_gpus"] == pytest.approx(hours, rel=1e-2)
    assert report["sampling"]["samples_per_s"] > 0 and report["ddp"] == {"skipped": "no GPU"}
