"""A seeded permutation of range(n) computed one index at a time: constant memory whatever n.

Why: torch.randperm(n).tolist() holds n Python ints (~36 bytes each) and takes O(n) time before the first batch;
a 10B-token file cut into 256-token windows is ~40M windows, ~1.4 GB per epoch just for the order. Here
position i maps to its index by an alternating (unbalanced) Feistel network over the smallest power of two
>= n, cycle-walking past indices >= n. Each round is invertible, so the map is a bijection of the power-of-two
domain, and cycle-walking restricts a bijection to range(n) (the walk from i < n always returns into range(n)
because the cycle through i contains it). The expected walk is < 2 steps since the domain is < 2n.
"""

from __future__ import annotations

import hashlib

ROUNDS = 6  # enough for a Feistel network to look random to a data order; each round costs ~1 us
MIN_BITS = 2  # below 4 indices a Feistel network has no room to mix; cycle-walking covers the difference
M64 = (1 << 64) - 1


def round_keys(seed: int, epoch: int) -> tuple[int, ...]:
    """ROUNDS 64-bit keys from (seed, epoch) alone, the same on every platform and Python version."""
    digest = hashlib.blake2b(f"mptrain-order:{seed}:{epoch}".encode(), digest_size=8 * ROUNDS).digest()
    return tuple(int.from_bytes(digest[8 * r : 8 * r + 8], "little") for r in range(ROUNDS))


def mix(x: int, key: int) -> int:
    """A 64-bit round function (splitmix64's finaliser on x + key)."""
    z = (x + key) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


class FeistelPermutation:
    """perm[i] for i in range(n): a bijection of range(n) fixed by (seed, epoch); nothing stored but the keys."""

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 1:
            raise ValueError(f"a permutation of {n} items")
        self.n = n
        bits = max(MIN_BITS, (n - 1).bit_length())
        self.hi, self.lo = bits // 2, bits - bits // 2  # widths of the halves (the low half is the larger)
        self.keys = round_keys(seed, epoch)

    def _once(self, x: int) -> int:
        # state (left, right) of widths (wl, wr); a round makes it (right, left ^ F(right)) of widths (wr, wl)
        wl, wr = self.hi, self.lo
        left, right = x >> wr, x & ((1 << wr) - 1)
        for key in self.keys:
            left, right = right, left ^ (mix(right, key) & ((1 << wl) - 1))
            wl, wr = wr, wl
        return (left << wr) | right  # an even number of rounds: the widths are back to (hi, lo)

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        x = self._once(i)
        while x >= self.n:  # cycle-walk back into range(n)
            x = self._once(x)
        return x

    def __len__(self) -> int:
        return self.n
