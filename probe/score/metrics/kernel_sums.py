"""Kernel sums between groups of rows, so every jackknife replicate of an MMD (KID, CMMD) is a quadratic form.

The kernel matrices are computed once, in row chunks, and summed per pair of jackknife groups; removing a
group is then O(G²) instead of a new O(n² d) kernel (see probe.stats.jackknife for the interval itself).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from probe.stats.jackknife import Design

Kernel = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _one_hot(groups: np.ndarray, n_groups: int) -> np.ndarray:
    out = np.zeros((len(groups), n_groups))
    out[np.arange(len(groups)), groups] = 1.0
    return out


def _group_sums(kernel: Kernel, a: np.ndarray, b: np.ndarray, ga: np.ndarray, gb: np.ndarray, n_a: int, n_b: int,
                same: bool, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Σ k(a_i, b_j) for every (group of i, group of j), in row chunks (no full n x m matrix held), and the
    per-group sums of the diagonal k(a_i, a_i) when a is b."""
    sums, diagonal = np.zeros((n_a, n_b)), np.zeros(n_a)
    columns = _one_hot(gb, n_b)
    for start in range(0, len(a), chunk):
        block = kernel(a[start : start + chunk], b)
        np.add.at(sums, ga[start : start + chunk], block @ columns)
        if same:
            rows = np.arange(len(block))
            np.add.at(diagonal, ga[start : start + chunk], block[rows, start + rows])
    return sums, diagonal


@dataclass(frozen=True)
class GroupKernel:
    """Kernel sums between groups of rows: any MMD² of a union of groups is a quadratic form in group weights."""

    xx: np.ndarray
    yy: np.ndarray
    xy: np.ndarray
    x_diagonal: np.ndarray
    y_diagonal: np.ndarray
    x_counts: np.ndarray
    y_counts: np.ndarray

    @classmethod
    def of(cls, kernel: Kernel, x: np.ndarray, y: np.ndarray, design: Design, chunk: int = 1024) -> GroupKernel:
        """One pass over the kernel matrices (O(n² d)), chunked to bound memory."""
        gx, gy, nx, ny = design.x_groups, design.y_groups, design.n_x_groups, design.n_y_groups
        xx, x_diagonal = _group_sums(kernel, x, x, gx, gx, nx, nx, True, chunk)
        yy, y_diagonal = _group_sums(kernel, y, y, gy, gy, ny, ny, True, chunk)
        xy, _ = _group_sums(kernel, x, y, gx, gy, nx, ny, False, chunk)
        return cls(xx, yy, xy, x_diagonal, y_diagonal, np.bincount(gx, minlength=nx).astype(float),
                   np.bincount(gy, minlength=ny).astype(float))

    def mmd2(self, keep_x: np.ndarray, keep_y: np.ndarray, *, unbiased: bool) -> float:
        """MMD² of the kept groups: biased V-statistic, or the unbiased U-statistic (diagonals dropped)."""
        wx, wy = keep_x.astype(float), keep_y.astype(float)
        nx, ny = float(wx @ self.x_counts), float(wy @ self.y_counts)
        if nx < 1 + unbiased or ny < 1 + unbiased:
            raise ValueError(f"MMD needs at least {1 + unbiased} rows per set, got {nx:g} and {ny:g}")
        sxx, syy, sxy = wx @ self.xx @ wx, wy @ self.yy @ wy, wx @ self.xy @ wy
        if unbiased:
            within = (sxx - wx @ self.x_diagonal) / (nx * (nx - 1)) + (syy - wy @ self.y_diagonal) / (ny * (ny - 1))
        else:
            within = sxx / nx**2 + syy / ny**2
        return float(within - 2 * sxy / (nx * ny))
