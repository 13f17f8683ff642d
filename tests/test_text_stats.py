"""The compiled per-text statistics: exact n-gram repetition and the stable content hash."""

from __future__ import annotations

import random

import polars as pl
import pytest

from mpo.text_stats import SLICE_ROWS, common_prefix, content_hash, hex64, repetition


def python_repetition(text: str, n: int) -> float:
    """The plain-Python rule the kernel must reproduce exactly."""
    words = text.split(" ")
    grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def test_repetition_equals_the_python_rule_exactly() -> None:
    rng = random.Random(1)
    # Long words that share length and first and last 8 bytes collide in the word hash:
    # only the byte check tells them apart.
    vocab = ["a", "b", "c", "dd", "", "é", "答案", "abcdefgh-1-ijklmnop", "abcdefgh-2-ijklmnop", "x" * 30]
    texts = [" ".join(rng.choices(vocab, k=rng.randint(0, 40))) for _ in range(3000)]
    texts += ["", " ", "a b c d a b c d", "abcdefgh-1-ijklmnop q r s abcdefgh-2-ijklmnop q r s"]
    for n in (1, 2, 4):
        got = repetition(pl.Series(texts), n).to_list()
        assert got == [python_repetition(t, n) for t in texts]  # bit-identical floats, no approx
    assert repetition(pl.Series(["abcdefgh-1-ijklmnop q r s abcdefgh-2-ijklmnop q r s"]), 4).item() == 0.0


def test_repetition_over_many_slices_keeps_row_order() -> None:
    texts = [("w " * (i % 7)) + f"u{i} v{i} x{i} y{i}" for i in range(2 * SLICE_ROWS + 5)]
    got = repetition(pl.Series(texts), 2)
    assert got.len() == len(texts)
    assert got.to_list() == [python_repetition(t, 2) for t in texts]


def test_common_prefix_counts_shared_leading_bytes_of_row_pairs() -> None:
    rng = random.Random(2)
    texts = ["".join(rng.choices("ab é", k=rng.randint(0, 12))) for _ in range(300)]
    texts += [
        texts[i][: rng.randint(0, len(texts[i]))] + "".join(rng.choices("ab é", k=3)) for i in range(300)
    ]
    first = [rng.randrange(len(texts)) for _ in range(2 * SLICE_ROWS + 3)]
    second = [rng.randrange(len(texts)) for _ in first]
    got = common_prefix(pl.Series(texts), pl.Series(first), pl.Series(second)).to_list()
    expected = []
    for i, j in zip(first, second, strict=True):
        x, y = texts[i].encode(), texts[j].encode()
        expected.append(next((k for k in range(min(len(x), len(y))) if x[k] != y[k]), min(len(x), len(y))))
    assert got == expected
    assert common_prefix(
        pl.Series(["It is red.", None, "It is blue."]), pl.Series([0, 1]), pl.Series([2, 0])
    ).to_list() == [6, 0]
    with pytest.raises(ValueError, match="as many first as second"):
        common_prefix(pl.Series(["a", "b"]), pl.Series([0]), pl.Series([0, 1]))
    with pytest.raises(IndexError, match="0..1"):
        common_prefix(pl.Series(["a", "b"]), pl.Series([0]), pl.Series([2]))


def test_repetition_reads_null_as_empty_and_rejects_bad_n() -> None:
    assert repetition(pl.Series([None, "a a a a a"], dtype=pl.String), 2).to_list() == [0.0, 0.75]
    with pytest.raises(ValueError, match="n-gram size"):
        repetition(pl.Series(["a"]), 0)


def test_content_hash_is_pinned_and_separates_texts() -> None:
    # Pinned values: pair ids are built on this hash, so it must never drift between versions.
    assert hex64(content_hash(pl.Series(["", "a", "Final answer: 2", "é" * 9]))).to_list() == [
        "0000000000000000",
        "223eca5d0e8b970b",
        "e6f8b1a8068cfd6e",
        "40678590fe06e453",
    ]
    rng = random.Random(0)
    texts = list({"".join(rng.choices("ab ", k=rng.randint(1, 24))) for _ in range(20000)})
    hashes = content_hash(pl.Series(texts))
    assert hashes.n_unique() == len(texts)
    # Same bytes, same hash, whatever the slice the text lands in.
    again = content_hash(pl.Series(["pad"] * (SLICE_ROWS - 1) + texts[:3]))
    assert again.tail(3).to_list() == hashes.head(3).to_list()


def test_hex64_is_big_endian_lowercase() -> None:
    assert hex64(pl.Series([0, 1, 2**64 - 1], dtype=pl.UInt64)).to_list() == [
        "0000000000000000",
        "0000000000000001",
        "ffffffffffffffff",
    ]
