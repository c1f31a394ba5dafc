"""Counter-based seeds: every random draw of a method is a pure function of (method seed, stream, step, layer).

So a draw can be regenerated exactly (Flat-LoRA's backward, gradient-checkpointing re-runs), is identical on all
ranks, and a resumed run draws exactly what an uninterrupted run would. The global RNG is never touched.
"""

from __future__ import annotations

import zlib

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, stream: str, *counters: int) -> int:
    """A 63-bit seed mixed from the user's seed, a stream name (one per method and purpose) and counters."""
    x = _splitmix64((seed & _MASK64) ^ zlib.crc32(stream.encode()))
    for c in counters:
        x = _splitmix64(x ^ (c & _MASK64))
    return x & ((1 << 63) - 1)


class GeneratorPool:
    """One reusable `torch.Generator` per device, reseeded for each draw (reseeding costs ~1 us on CPU)."""

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}

    def get(self, device: torch.device, seed: int) -> torch.Generator:
        device = torch.device(device)
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        gen.manual_seed(seed)
        return gen
