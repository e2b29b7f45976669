"""Factored SVDs equal dense SVDs."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab.linalg import lowrank_svd, random_orthonormal, truncated_svd


@given(st.integers(1, 20), st.integers(1, 20), st.integers(1, 8), st.integers(0, 10_000))
@settings(max_examples=60, deadline=None)
def test_lowrank_svd_matches_dense(m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    B, A = torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64)
    U, s, Vh = lowrank_svd(B, A)
    dense_s = truncated_svd(B @ A)[1]
    torch.testing.assert_close(s, dense_s, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(U * s @ Vh, B @ A, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(U.T @ U, torch.eye(len(s), dtype=torch.float64), rtol=0, atol=1e-9)
    assert len(s) <= min(m, n, r)


def test_random_orthonormal_is_orthonormal_and_seeded():
    Q = random_orthonormal(9, 4, torch.Generator().manual_seed(3))
    assert Q.shape == (9, 4) and Q.dtype == torch.float64
    torch.testing.assert_close(Q.T @ Q, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(Q, random_orthonormal(9, 4, torch.Generator().manual_seed(3)), rtol=0, atol=0)
    assert not torch.allclose(Q, random_orthonormal(9, 4, torch.Generator().manual_seed(4)))
    square = random_orthonormal(5, 5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(square @ square.T, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)
