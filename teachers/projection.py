"""A channel projection of a teacher's FPN features (``compression.pca``): fitted once per cache on a sample, stored
in the cache folder, applied as the shards are encoded and undone as they are read.

Per level l, with the sample's channel mean ``mu_l`` [C] and the top ``r`` eigenvectors ``W_l`` [C, r] of its channel
covariance (over every cell of every sample image), a feature map ``F`` [C, H, W] is stored as
``Z = W_l^T (F - mu_l)`` [r, H, W] (then rounded by the dtype, pooled or not, as any map) and read back as
``mu_l + W_l Z`` [C, H, W], so the losses, adapters and masks see the teacher's own channels. What is lost is the
part of F outside the r-dimensional subspace; its share of the sample's variance is recorded per level
(``residual``) and printed by `curriculum cache inspect`. `curriculum cache verify` compares the stored Z with the
live teacher's, projected and rounded alike; readers can also hand Z itself to the losses (``cache.features:
components``).

Cost: r/C of the dense bytes, plus one [C, r] basis and one [C] mean per level per cache (kilobytes); decoding is a
[C, r] x [r, HW] product per map; the fit runs the teacher on ``pca_images`` images in the precompute's driver.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from curriculum.errors import CacheError

FILE = "projection.npz"


@dataclass(frozen=True)
class Projection:
    """Per FPN level: mean [C] and orthonormal basis [C, r] (float32), and the sample variance left out."""

    mean: dict[str, np.ndarray]
    basis: dict[str, np.ndarray]
    residual: dict[str, float]

    @property
    def channels(self) -> int:
        return next(iter(self.basis.values())).shape[1]

    def project(self, level: str, f: np.ndarray) -> np.ndarray:
        """[C, H, W] -> [r, H, W]."""
        w, mu = self.basis[level], self.mean[level]
        c, h, wd = f.shape
        z = w.T @ (f.reshape(c, -1).astype(np.float32) - mu[:, None])
        return np.ascontiguousarray(z.reshape(w.shape[1], h, wd), dtype=np.float32)

    def reconstruct(self, level: str, z: np.ndarray) -> np.ndarray:
        """[r, H, W] -> [C, H, W]."""
        w, mu = self.basis[level], self.mean[level]
        r, h, wd = z.shape
        return np.ascontiguousarray((w @ z.reshape(r, -1) + mu[:, None]).reshape(w.shape[0], h, wd), dtype=np.float32)

    def teacher_space(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A decoded row with its `features/<level>` maps reconstructed in the teacher's channels."""
        return {n: self.reconstruct(n.split("/", 1)[1], a) if n.startswith("features/") else a for n, a in row.items()}

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        arrays = {f"mean/{k}": v for k, v in self.mean.items()} | {f"basis/{k}": v for k, v in self.basis.items()}
        np.savez(buf, **arrays, residual_levels=np.array(list(self.residual)),
                 residual=np.array(list(self.residual.values()), np.float64))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Projection:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                mean = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("mean/")}
                basis = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("basis/")}
                residual = dict(zip(z["residual_levels"].tolist(), z["residual"].tolist()))
        except (ValueError, KeyError, OSError) as e:
            raise CacheError(f"{where}: the feature projection cannot be read ({e}); delete the cache folder and "
                             "precompute again") from None
        return cls(mean, basis, residual)


def fit_projection(features: Callable[[Sequence[int]], list[dict[str, np.ndarray]]], positions: Sequence[int],
                   channels: int, batch_size: int = 8) -> Projection:
    """PCA per level of ``features(positions)`` (each a row of ``features/<level>`` maps [C, H, W]): mean and the
    top `channels` eigenvectors of the channel covariance over every cell, accumulated in float64."""
    sums: dict[str, np.ndarray] = {}
    outer: dict[str, np.ndarray] = {}
    cells: dict[str, int] = {}
    for b in range(0, len(positions), batch_size):
        for row in features(positions[b:b + batch_size]):
            for name, f in row.items():
                if not name.startswith("features/"):
                    continue
                level = name.split("/", 1)[1]
                x = f.reshape(f.shape[0], -1).astype(np.float64)
                if channels >= x.shape[0]:
                    raise CacheError(f"compression.pca: {channels} channels is not fewer than the teacher's "
                                     f"{x.shape[0]} at {level}; choose fewer, or pca: 0")
                sums[level] = sums.get(level, 0.0) + x.sum(1)
                outer[level] = outer.get(level, 0.0) + x @ x.T
                cells[level] = cells.get(level, 0) + x.shape[1]
    if not cells:
        raise CacheError("compression.pca: the teacher gave no FPN features to fit a projection on "
                         "(cache.targets needs 'features')")
    mean, basis, residual = {}, {}, {}
    for level, n in cells.items():
        mu = sums[level] / n
        cov = outer[level] / n - np.outer(mu, mu)
        vals, vecs = np.linalg.eigh(cov)  # ascending
        top = vecs[:, ::-1][:, :channels]
        total = float(np.clip(vals, 0, None).sum())
        mean[level] = mu.astype(np.float32)
        basis[level] = np.ascontiguousarray(top, dtype=np.float32)
        residual[level] = 1.0 - float(np.clip(vals[::-1][:channels], 0, None).sum()) / total if total > 0 else 0.0
    return Projection(mean, basis, residual)


def sample_positions(num_images: int, n: int) -> list[int]:
    """`n` data-set positions spread evenly over the data set (all of them when it is smaller)."""
    if n >= num_images:
        return list(range(num_images))
    return sorted({int(round(i * (num_images - 1) / max(1, n - 1))) for i in range(n)})


def describe(p: Projection) -> dict[str, Any]:
    return {"channels": p.channels, "residual": {k: round(v, 5) for k, v in p.residual.items()}}
