"""N-gram keys for the proposers' indexes: a polynomial hash of the tokens mod 2^30, computed
from per-position prefix hashes, so a key costs one multiply-subtract instead of building and
hashing a tuple of n tokens, and a long append (a prompt, a finished output) computes every key
at C speed (numpy, mod 2^64, then masked: the same value). 30 bits keep keys single-digit Python
ints, which the garbage collector does not track (tuples it does: an index of a few hundred
thousand of them made collections land in steps). A key shared by two n-grams only merges their
occurrences: a draft may be wrong, and verification rejects it.
"""
from __future__ import annotations

import numpy as np

MASK = (1 << 30) - 1
_P64 = 0x9E3779B97F4A7C15
P = _P64 & MASK  # odd: invertible mod 2^64, hence mod 2^30
_PINV64 = pow(_P64, -1, 1 << 64)
POW = [pow(P, n, 1 << 30) for n in range(65)]  # P^n mod 2^30, for n-grams up to 64 tokens
NUMPY_FROM = 48  # tokens appended (or keys computed) at once from which numpy beats a Python loop


def gram_key(gram: list[int] | tuple[int, ...]) -> int:
    """The key of an n-gram (what an index's tables are keyed by)."""
    h = 0
    for x in gram:
        h = (h * P + x + 2) & MASK
    return h


def prefix_hashes(new: list[int], f0: int) -> list[int]:
    """Prefix hashes continuing from f0 over new tokens: F[j] = F[j-1] * P + token + 2."""
    if len(new) < NUMPY_FROM:
        out = []
        for x in new:
            f0 = (f0 * P + x + 2) & MASK
            out.append(f0)
        return out
    # F[j] = P^(j+1) * (f0 + sum_{k<=j} a_k * P^-(k+1)): cumulative sums and products wrap
    # mod 2^64 in uint64; masked to 30 bits that is the Python loop's value.
    a = np.asarray(new, dtype=np.int64).astype(np.uint64) + np.uint64(2)
    pw = np.cumprod(np.full(len(a), _P64, dtype=np.uint64))
    pinv = np.cumprod(np.full(len(a), _PINV64, dtype=np.uint64))
    return ((pw * (np.cumsum(a * pinv) + np.uint64(f0))) & np.uint64(MASK)).tolist()


def gram_keys(prefix: list[int], n: int, lo: int, stop: int) -> list[int]:
    """Keys of the n-grams ending at positions lo..stop-1 (lo >= n - 1) of the tokens whose
    prefix hashes are `prefix`."""
    pw = POW[n]
    if stop - lo < NUMPY_FROM:
        f = prefix
        return [(f[e] - (f[e - n] if e >= n else 0) * pw) & MASK for e in range(lo, stop)]
    return gram_keys_array(np.array(prefix[max(0, lo - n):stop], dtype=np.int64), n, lo - max(0, lo - n),
                           stop - max(0, lo - n)).tolist()


def gram_keys_array(f: np.ndarray, n: int, lo: int, stop: int) -> np.ndarray:
    """`gram_keys` over an int64 array of prefix hashes (positions relative to its start; a
    position before it counts as the empty prefix only where lo < n)."""
    cur = f[lo:stop]
    prev = f[lo - n:stop - n] if lo >= n else np.concatenate((np.zeros(n - lo, np.int64), f[:stop - n]))
    return (cur - prev * POW[n]) & MASK


def tail_key(prefix: list[int], n: int) -> int:
    """The key of the last n tokens (n <= their count), from two prefix hashes."""
    e = len(prefix) - 1
    return (prefix[e] - (prefix[e - n] if e >= n else 0) * POW[n]) & MASK
