"""A seeded permutation of range(n) computed a chunk of positions at a time: constant memory whatever n.

Why: torch.randperm(n).tolist() holds n Python ints (~47 bytes a window, measured) and takes O(n) time first;
a 10B-token file cut into 256-token windows is ~40M windows, ~1.8 GB per epoch just for the order. Here
position i maps to its index by an alternating (unbalanced) Feistel network over the smallest power of two
>= n, cycle-walking past indices >= n. Each round is invertible, so the map is a bijection of the power-of-two
domain, and cycle-walking restricts a bijection to range(n) (the walk from i < n always returns into range(n)
because the cycle through i contains it). The expected walk is < 2 steps since the domain is < 2n.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

ROUNDS = 6  # even (the halves' widths return), and enough for a Feistel network to look random to a data order
MIN_BITS = 2  # below 4 indices a Feistel network has no room to mix; cycle-walking covers the difference
CHUNK = 4096  # positions computed together in numpy (~30 KB): constant memory, ~0.1 us an index, not ~7 in Python


def round_keys(seed: int, epoch: int) -> np.ndarray:
    """ROUNDS 64-bit keys from (seed, epoch) alone, the same on every platform and Python version."""
    digest = hashlib.blake2b(f"mptrain-order:{seed}:{epoch}".encode(), digest_size=8 * ROUNDS).digest()
    return np.frombuffer(digest, dtype="<u8").astype(np.uint64)


def mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """A 64-bit round function (splitmix64's finaliser on x + key; uint64 arithmetic wraps as it needs)."""
    z = x + key
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class FeistelPermutation:
    """perm[i] for i in range(n): a bijection of range(n) fixed by (seed, epoch); nothing stored but the keys."""

    def __init__(self, n: int, seed: int, epoch: int):
        if not 1 <= n < 2**63:
            raise ValueError(f"a permutation of {n} items")
        self.n = n
        bits = max(MIN_BITS, (n - 1).bit_length())
        self.hi, self.lo = bits // 2, bits - bits // 2  # widths of the halves (the low half is the larger)
        self.keys = round_keys(seed, epoch)

    def _once(self, x: np.ndarray) -> np.ndarray:
        # state (left, right) of widths (wl, wr); a round makes it (right, left ^ F(right)) of widths (wr, wl)
        wl, wr = self.hi, self.lo
        left, right = x >> np.uint64(wr), x & np.uint64((1 << wr) - 1)
        for key in self.keys:
            left, right = right, left ^ (mix(right, key) & np.uint64((1 << wl) - 1))
            wl, wr = wr, wl
        return (left << np.uint64(wr)) | right  # an even number of rounds: the widths are back to (hi, lo)

    def take(self, positions: np.ndarray) -> np.ndarray:
        """perm[positions] (each in range(n)) as int64."""
        x = self._once(np.asarray(positions, dtype=np.uint64))
        out = x >= self.n
        while out.any():  # cycle-walk back into range(n)
            x[out] = self._once(x[out])
            out = x >= self.n
        return x.astype(np.int64)

    def stream(self, start: int, stop: int, step: int = 1) -> Iterator[int]:
        """perm[k % n] for k in range(start, stop, step), CHUNK at a time (k % n: an order padded past its end)."""
        for first in range(start, stop, CHUNK * step):
            positions = np.arange(first, min(stop, first + CHUNK * step), step, dtype=np.int64) % self.n
            yield from self.take(positions).tolist()

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return int(self.take(np.array([i]))[0])

    def __len__(self) -> int:
        return self.n
