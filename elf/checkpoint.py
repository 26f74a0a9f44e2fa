"""Training checkpoints: atomic directories that a killed run resumes from exactly.

`checkpoints/step-000200/` holds
- `model.safetensors`, `ema.safetensors`      weights and the fp32 EMA shadow
- `optimizer.pt`                              optimiser state (tensors, numbers, strings only: loaded with
                                              `torch.load(weights_only=True)`, never arbitrary pickles)
- `rank-<r>.json` / `rank-<r>-rng.safetensors`  each rank's loader state and RNG states
- `trainer.json`                              step, scheduler state, loss history, MLflow run id
- `checkpoint.json`                           written last: sha256 of every file above

A checkpoint counts only once `checkpoint.json` exists and every hash matches; the directory is built
under a temporary name and renamed into place, so a kill mid-save leaves the previous checkpoint as the
latest. A checkpoint that exists but fails its hashes is an error naming the file, never a silent restart.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from elf.errors import ElfError
from elf.files import naming_os_errors, read_json, write_json_atomic
from elf.hashing import file_sha256

INDEX = "checkpoint.json"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def tmp_dir(root: Path, step: int) -> Path:
    return root / f".step-{step:06d}.tmp"


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with naming_os_errors(path):
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def save_optimizer_state(path: Path, state: dict[str, Any]) -> None:
    """`torch.save` through a Python file: given a path, torch reports a full disk as "enforce fail" without errno."""
    with naming_os_errors(path), open(path, "wb") as handle:
        torch.save(state, handle)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 - safetensors' own error type is not exported consistently
        raise ElfError(f"{path}: cannot read tensors ({type(error).__name__}: {error})") from None


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU, and CUDA when present)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def finalise(root: Path, step: int, keep: int) -> Path:
    """Hash the files of a fully written temporary checkpoint, write its index, rename it into place.

    Then delete all but the newest `keep` checkpoints. Called by one process (rank 0) after every rank has
    written its files.
    """
    tmp = tmp_dir(root, step)
    files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    write_json_atomic(tmp / INDEX, {"step": step, "files": files})
    final = step_dir(root, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Completed checkpoint directories (with an index), oldest first; temporary leftovers are ignored."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / INDEX).exists()]
    return [p for _, p in sorted(found)]


def checkpoint_step(directory: Path) -> int:
    """The step of a directory named by `step_dir`."""
    return int(_STEP_DIR.match(directory.name).group(1))


def clean_partial(root: Path) -> None:
    """Remove temporary checkpoint directories left by a kill during a save."""
    if root.is_dir():
        for leftover in root.glob(".step-*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)


def verify(directory: Path) -> dict[str, Any]:
    """Check every file of a checkpoint against its index; errors name the bad file."""
    index = read_json(directory / INDEX, "checkpoint index")
    for name, digest in index.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise ElfError(f"{path}: missing from checkpoint (listed in {directory / INDEX})")
        if file_sha256(path) != digest:
            raise ElfError(f"{path}: corrupt checkpoint file (sha256 does not match {directory / INDEX}); "
                           f"delete {directory} to resume from an earlier checkpoint")
    return index


def load_optimizer_state(path: Path) -> dict[str, Any]:
    """Optimiser state with `weights_only=True`: tensors and plain containers, never arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for unreadable files
        raise ElfError(f"{path}: cannot read optimiser state ({type(error).__name__})") from None


def read_trainer_state(directory: Path) -> dict[str, Any]:
    return read_json(directory / "trainer.json", "trainer state")


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def move_aside(checkpoints: list[Path], out: Path, label: str) -> Path:
    """Move checkpoint directories into `<out>.aside/<label>/` (numbered when taken), outside what DVC tracks:
    training state is never deleted on a settings change, and moving it back (with the old settings) resumes."""
    target, number = out.parent / f"{out.name}.aside" / label, 1
    while target.exists():
        number += 1
        target = target.with_name(f"{label}-{number}")
    target.mkdir(parents=True)
    for directory in checkpoints:
        os.replace(directory, target / directory.name)
    return target
