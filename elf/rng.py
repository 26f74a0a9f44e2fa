"""Counter-based random numbers: every row of a batch gets its own stream, all rows drawn in one batched call.

The training noise of a row must depend on (seed, step, row of the global batch) only, so that any number of
processes and micro-batches, and a resumed run, see the same draws (elf/step.py). One `torch.Generator` per
row does that at the cost of a Python loop and ~6 tiny kernel launches per row; here a row's stream is a pure
function of its key instead, evaluated for all rows at once with integer tensor ops on any device (and equal
on every device, up to the last bit of the float transforms).

Generator: splitmix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014),
the stream of a key k being mix(mix(k) + i·γ) for i = 0, 1, ...; uniforms take its top 53 bits, normals come
from pairs of uniforms by the Box–Muller transform. int64 arithmetic wraps (two's complement), as splitmix64's
unsigned arithmetic does; right shifts are made logical with a mask.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _signed(value: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GAMMA = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's `>>` is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: Tensor) -> Tensor:
    """splitmix64's finaliser: a bijection of 64-bit words with full avalanche."""
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def stream_keys(seeds: Tensor | list[int], stream: int, device: torch.device | str = "cpu") -> Tensor:
    """[B] int64 keys of sub-stream `stream` (0, 1, ...) of each row seed: independent streams per purpose."""
    seeds = torch.as_tensor(seeds, dtype=torch.int64, device=device)
    return _mix(_mix(seeds) ^ _mix(torch.full_like(seeds, stream + 1)))


def uniform(keys: Tensor, count: int) -> Tensor:
    """[B, count] float32 uniforms in (0, 1): the first `count` numbers of each key's stream."""
    index = torch.arange(count, dtype=torch.int64, device=keys.device)
    z = _mix(keys[:, None] + index[None] * _GAMMA)
    return ((_shift_right(z, 11).double() + 0.5) * 2.0**-53).float()


def normal(keys: Tensor, count: int) -> Tensor:
    """[B, count] float32 standard normals (Box–Muller on the first 2·⌈count/2⌉ uniforms of each stream)."""
    pairs = (count + 1) // 2
    index = torch.arange(2 * pairs, dtype=torch.int64, device=keys.device)
    z = _mix(keys[:, None] + index[None] * _GAMMA)
    u = (_shift_right(z, 11).double() + 0.5) * 2.0**-53
    radius = torch.sqrt(-2.0 * torch.log(u[:, 0::2]))
    angle = 2.0 * math.pi * u[:, 1::2]
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1).flatten(1)[:, :count].float()
