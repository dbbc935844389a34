"""bench/run.py labels each row with the token count it really ran with (issue 8: with
``--max-tokens`` below 10,000 the rows said "10k" and "10000" while rotating fewer)."""

from __future__ import annotations

import pytest

from bench.run import rotation_count, rotation_label, token_counts


@pytest.mark.parametrize(
    ("max_tokens", "counts", "label"),
    [
        (100_000, [1, 100, 1000, 10_000, 100_000], "e tracegate 10,000 tokens"),
        (10_000, [1, 100, 1000, 10_000], "e tracegate 10,000 tokens"),
        (5000, [1, 100, 1000, 5000], "e tracegate 5,000 tokens"),
        (100, [1, 100], "e tracegate 100 tokens"),
        (1, [1], "e tracegate 1 token"),
    ],
)
def test_rows_name_the_count_they_ran_with(max_tokens: int, counts: list[int], label: str) -> None:
    assert token_counts(max_tokens) == counts
    assert max(token_counts(max_tokens)) == max_tokens
    assert rotation_label(max_tokens) == label
    assert rotation_count(max_tokens) <= max_tokens
