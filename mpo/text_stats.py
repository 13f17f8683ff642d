"""Per-text statistics that need a pass over every byte: word n-gram repetition, a
stable 64-bit content hash, and the prefix two texts share.

Dataframe libraries spend ~40 ns per word splitting text into lists (a million CoT
responses hold ~130M words), so these two run as small compiled loops (numba) over the
UTF-8 bytes of an Arrow string array, a slice per thread (the loops release the GIL).

- ``repetition``: the share of repeated word n-grams, words split on ``" "`` exactly as
  ``text.split(" ")`` does; ``1 - distinct / total`` (0 below n words). N-grams are
  matched by hash and then confirmed byte by byte, so the value is exact.
- ``content_hash``: 64 bits, defined here (8-byte little-endian blocks, multiply-rotate
  rounds, murmur3's finaliser), so the same text hashes the same on every machine and
  library version. Pair ids and duplicate detection build on it.
- ``common_prefix``: how many leading UTF-8 bytes two texts of one column share, for
  pairs of row positions (pairing's candidate pairs carry positions, not texts, so
  millions of candidates cost two integers each); ranks hard negatives
  (``PairSelection.CLOSEST``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import polars as pl
import pyarrow as pa

_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xC2B2AE3D27D4EB4F)
_K3 = np.uint64(0x165667B19E3779F9)
_SPACE = 32
SLICE_ROWS = 16_384  # rows per kernel call: several slices keep both cores busy


@numba.njit(inline="always")
def _fmix(x: np.uint64) -> np.uint64:
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return x


@numba.njit(inline="always")
def _load(data: np.ndarray, start: int, count: int) -> np.uint64:
    """Up to 8 bytes from ``start`` as a little-endian integer (inlined: with a literal
    ``count`` of 8 the loop unrolls and LLVM fuses the byte loads)."""
    word = np.uint64(0)
    for b in range(count):
        word |= np.uint64(data[start + b]) << np.uint64(8 * b)
    return word


@numba.njit(inline="always")
def _round(h: np.uint64, word: np.uint64) -> np.uint64:
    h ^= word * _K1
    h = (h << np.uint64(31)) | (h >> np.uint64(33))
    return h * _K2


@numba.njit(nogil=True, cache=True)
def _hash_kernel(offsets: np.ndarray, data: np.ndarray, out: np.ndarray) -> None:
    for i in range(offsets.size - 1):
        lo, hi = offsets[i], offsets[i + 1]
        h = np.uint64(hi - lo) * _K3
        p = lo
        while p + 8 <= hi:
            h = _round(h, _load(data, p, 8))
            p += 8
        if p < hi:
            h = _round(h, _load(data, p, hi - p) ^ _K3)
        out[i] = _fmix(h)


@numba.njit(inline="always")
def _word_hash(data: np.ndarray, start: int, end: int) -> np.uint64:
    """Length plus first and last (up to) 8 bytes: cheap, and words that share those only
    collide here, which costs the byte check of the caller, never a wrong count."""
    size = end - start
    h = np.uint64(size) * _K3
    if start + 8 <= data.size:
        head = _load(data, start, 8)
        if size < 8:
            head &= (np.uint64(1) << np.uint64(8 * size)) - np.uint64(1)
    else:
        head = _load(data, start, min(size, 8))
    h = _round(h, head)
    if size > 8:
        h = _round(h, _load(data, end - 8, 8))
    return _fmix(h)


@numba.njit(nogil=True, cache=True)
def _repetition_kernel(offsets: np.ndarray, data: np.ndarray, n: int, out: np.ndarray) -> None:
    longest = 1
    for i in range(offsets.size - 1):
        longest = max(longest, offsets[i + 1] - offsets[i] + 1)
    bounds = np.empty(
        longest + 1, np.int64
    )  # scratch, reused by every row: word w is bounds[w]..bounds[w+1]-1
    hashes = np.empty(longest, np.uint64)
    table = 1
    while table < 2 * longest:
        table *= 2
    slots = np.empty(table, np.int64)
    keys = np.empty(table, np.uint64)
    for i in range(offsets.size - 1):
        lo, hi = offsets[i], offsets[i + 1]
        # Branch-free split: the end slot of the current word is rewritten at every byte
        # and only moves on at a space, which leaves the space's position in it.
        words = 0
        for k in range(lo, hi):
            bounds[words + 1] = k + 1
            words += data[k] == _SPACE
        bounds[0] = lo
        bounds[words + 1] = hi + 1
        words += 1
        grams = words - n + 1
        if grams <= 0:
            out[i] = 0.0
            continue
        for w in range(words):
            hashes[w] = _word_hash(data, bounds[w], bounds[w + 1] - 1)
        size = 1
        while size < 2 * grams:
            size *= 2
        mask = np.uint64(size - 1)
        slots[:size] = -1
        distinct = 0
        for j in range(grams):
            g = hashes[j]
            for m in range(1, n):
                g = g * _K1 + hashes[j + m]  # independent across j: the loop pipelines
            s = np.int64(g & mask)
            while True:
                other = slots[s]
                if other < 0:
                    slots[s] = j
                    keys[s] = g
                    distinct += 1
                    break
                if keys[s] == g:
                    a0, a1 = bounds[j], bounds[j + n] - 1
                    b0, b1 = bounds[other], bounds[other + n] - 1
                    same = a1 - a0 == b1 - b0
                    q = 0
                    while same and q < a1 - a0:
                        same = data[a0 + q] == data[b0 + q]
                        q += 1
                    if same:
                        break
                s = np.int64((np.uint64(s) + np.uint64(1)) & mask)
        out[i] = 1.0 - distinct / grams  # written as Python's 1 - len(set) / len(grams)


@numba.njit(nogil=True, cache=True)
def _common_prefix_kernel(
    offsets: np.ndarray, data: np.ndarray, first: np.ndarray, second: np.ndarray, out: np.ndarray
) -> None:
    for i in range(first.size):
        a, b = offsets[first[i]], offsets[second[i]]
        size = min(offsets[first[i] + 1] - a, offsets[second[i] + 1] - b)
        k = 0
        while k < size and data[a + k] == data[b + k]:
            k += 1
        out[i] = k


def _buffers(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (int64) and UTF-8 bytes of a string array, without copying the bytes."""
    texts = texts.cast(pa.large_string())
    _, offsets, data = texts.buffers()
    starts = np.frombuffer(offsets, dtype=np.int64)[texts.offset : texts.offset + len(texts) + 1]
    payload = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return starts, payload


def _arrow_texts(texts: pl.Series) -> pa.Array:
    """``texts`` as one Arrow string array, nulls read as "" (what every kernel here sees)."""
    return texts.fill_null("").cast(pl.String).to_arrow()


def _in_slices(rows: int, work: Callable[[int, int], None]) -> None:
    """``work(start, stop)`` over ``SLICE_ROWS``-row slices, one per thread at a time."""
    slices = [(start, min(start + SLICE_ROWS, rows)) for start in range(0, rows, SLICE_ROWS)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(lambda bounds: work(*bounds), slices))


def _run(
    texts: pl.Series, dtype: type, kernel: Callable[[np.ndarray, np.ndarray, np.ndarray], None]
) -> np.ndarray:
    """Run ``kernel`` over ``texts`` (nulls read as "") a slice per thread."""
    arrow = _arrow_texts(texts)
    out: np.ndarray = np.empty(texts.len(), dtype)

    def one(start: int, stop: int) -> None:
        offsets, data = _buffers(arrow.slice(start, stop - start))
        kernel(offsets, data, out[start:stop])

    _in_slices(texts.len(), one)
    return out


def repetition(texts: pl.Series, n: int) -> pl.Series:
    """Share of repeated word n-grams per text, exactly as the plain-Python rule computes it."""
    if n < 1:
        raise ValueError(f"n-gram size must be >= 1, got {n}")
    values = _run(texts, np.float64, lambda o, d, out: _repetition_kernel(o, d, n, out))
    return pl.Series("repetition", values, dtype=pl.Float64)


def content_hash(texts: pl.Series) -> pl.Series:
    """Stable 64-bit hash of each text's UTF-8 bytes (nulls hash as "")."""
    return pl.Series("content_hash", _run(texts, np.uint64, _hash_kernel), dtype=pl.UInt64)


def common_prefix(texts: pl.Series, first: pl.Series, second: pl.Series) -> pl.Series:
    """Leading UTF-8 bytes that ``texts[first[i]]`` and ``texts[second[i]]`` share (nulls
    read as ""); ``first`` and ``second`` are row positions in ``texts``."""
    if first.len() != second.len():
        raise ValueError(
            f"common_prefix needs as many first as second positions, got {first.len()} and {second.len()}"
        )
    a, b = first.cast(pl.Int64).to_numpy(), second.cast(pl.Int64).to_numpy()
    if a.size and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= texts.len()):
        raise IndexError(f"common_prefix positions must lie in 0..{texts.len() - 1}")
    offsets, data = _buffers(_arrow_texts(texts))
    out: np.ndarray = np.empty(a.size, np.int64)

    def one(start: int, stop: int) -> None:
        _common_prefix_kernel(offsets, data, a[start:stop], b[start:stop], out[start:stop])

    _in_slices(a.size, one)
    return pl.Series("common_prefix", out, dtype=pl.Int64)


def hex64(values: pl.Series | np.ndarray) -> pl.Series:
    """16 lower-case hex digits per 64-bit value (big-endian), vectorised."""
    raw = np.ascontiguousarray(np.asarray(values, dtype=np.uint64).astype(">u8"))
    digits = np.frombuffer(raw.tobytes().hex().encode(), dtype="S16")
    return pl.Series(digits, dtype=pl.Binary).cast(pl.String)
