"""Per-cut PCA bases for the wire codec, fitted at partition time from calibration activations.

A ViT residual stream is far from full rank, so the edge can send the top r principal coefficients of
each token instead of all `width` values: `coeffs = (x - mean) @ basis[:, :r]`, undone in the cloud as
`coeffs @ basis[:, :r].T + mean`. The bases live in the bundle as `calibration.npz` with keys
`mean_03` / `basis_03` / `var_03` for cut 3 (numpy + zstandard-free: only numpy here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from splitclip.codec.errors import CodecError

_KEY = re.compile(r"^(mean|basis|var)_(\d+)$")


class CalibrationError(CodecError):
    """A calibration file, a fit input or a requested PCA basis is missing or malformed."""


@dataclass(frozen=True, eq=False)  # holds arrays: compared and hashed by identity
class Calibration:
    means: dict[int, NDArray[np.float32]]  # cut -> [width]
    bases: dict[int, NDArray[np.float32]]  # cut -> [width, width], orthonormal columns, by variance (desc)
    variances: dict[int, NDArray[np.float32]] = field(default_factory=dict)  # cut -> [width] eigenvalues
    # (cut, r) -> contiguous basis[:, :r]; a cache, so encode does not copy the slice every frame
    _proj: dict[tuple[int, int], NDArray[np.float32]] = field(default_factory=dict, repr=False, compare=False)
    _klt: dict[int, NDArray[np.float32]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def cuts(self) -> list[int]:
        return sorted(self.bases)

    @property
    def width(self) -> int | None:
        return next((int(m.shape[0]) for m in self.means.values()), None)

    def projection(self, cut: int, rank: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """(mean [width], basis[:, :rank] [width, rank]) for `cut`; CalibrationError if absent."""
        if cut not in self.bases:
            raise CalibrationError(f"calibration: no PCA basis for cut {cut} (has cuts {self.cuts})")
        basis = self.bases[cut]
        if not 1 <= rank <= basis.shape[1]:
            raise CalibrationError(f"calibration: rank {rank} for cut {cut}, expected 1..{basis.shape[1]}")
        key = (cut, rank)
        if key not in self._proj:
            self._proj[key] = np.ascontiguousarray(basis[:, :rank])
        return self.means[cut], self._proj[key]

    def klt_steps(self, cut: int) -> NDArray[np.float32]:
        """Relative quantiser step per PCA direction at `cut` for the `klt` codec: (var / mean var)^(-1/4).

        Measured on the demo model, the downstream sensitivity of a direction grows about as sqrt(var),
        so the step that balances weighted error shrinks as var^(-1/4) (finer steps where variance is
        high); variances are floored at 1e-4 of the mean so a degenerate direction gets a finite step.
        """
        if cut not in self.bases:
            raise CalibrationError(f"calibration: no PCA basis for cut {cut} (has cuts {self.cuts})")
        var = self.variances.get(cut)
        if var is None:
            raise CalibrationError(f"calibration: no variances (var_{cut:02d}) for cut {cut}, needed by klt")
        if cut not in self._klt:
            v = np.asarray(var, np.float64)
            ref = float(v.mean()) if v.size and float(v.mean()) > 0 else 1.0
            w = np.maximum(v / ref, 1e-4) ** -0.25
            self._klt[cut] = w.astype(np.float32)
        return self._klt[cut]

    def explained(self, cut: int, rank: int) -> float:
        """Fraction of calibration variance carried by the top `rank` directions at `cut`."""
        var = self.variances.get(cut)
        if var is None or float(var.sum()) <= 0.0:
            return float("nan")
        return float(var[:rank].sum() / var.sum())

    def save(self, path: str | Path) -> None:
        arrays: dict[str, NDArray[np.float32]] = {}
        for k in self.cuts:
            arrays[f"mean_{k:02d}"] = self.means[k]
            arrays[f"basis_{k:02d}"] = self.bases[k]
            if k in self.variances:
                arrays[f"var_{k:02d}"] = self.variances[k]
        with Path(path).open("wb") as f:  # np.savez would append ".npz" to a str path without it
            np.savez(f, **arrays)  # type: ignore[arg-type]

    @staticmethod
    def load(path: str | Path) -> Calibration:
        try:
            with np.load(Path(path), allow_pickle=False) as z:
                raw = {name: np.asarray(z[name]) for name in z.files}
        except (OSError, ValueError, EOFError) as e:
            raise CalibrationError(f"calibration file {path}: cannot read ({e})") from e
        groups: dict[str, dict[int, NDArray[np.float32]]] = {"mean": {}, "basis": {}, "var": {}}
        for name, arr in raw.items():
            m = _KEY.match(name)
            if m is None:
                raise CalibrationError(f"calibration file {path}: unexpected key {name!r}")
            groups[m.group(1)][int(m.group(2))] = arr.astype(np.float32)
        cal = Calibration(groups["mean"], groups["basis"], groups["var"])
        cal.validate(str(path))
        return cal

    def validate(self, where: str = "calibration") -> None:
        if set(self.means) != set(self.bases):
            raise CalibrationError(
                f"{where}: cuts with a mean {sorted(self.means)} != cuts with a basis {self.cuts}"
            )
        widths = set()
        for k in self.cuts:
            mean, basis = self.means[k], self.bases[k]
            w = mean.shape[0] if mean.ndim == 1 else -1
            if mean.ndim != 1 or basis.shape != (w, w):
                raise CalibrationError(
                    f"{where}: cut {k}: mean {mean.shape} / basis {basis.shape}, expected [width] / [width, width]"
                )
            if k in self.variances and self.variances[k].shape != (w,):
                raise CalibrationError(f"{where}: cut {k}: var {self.variances[k].shape}, expected ({w},)")
            if k in self.variances and not (
                np.isfinite(self.variances[k]).all() and (self.variances[k] >= 0).all()
            ):
                raise CalibrationError(f"{where}: cut {k}: var contains NaN, Inf or negative values")
            if not (np.isfinite(mean).all() and np.isfinite(basis).all()):
                raise CalibrationError(f"{where}: cut {k}: mean/basis contain NaN or Inf")
            widths.add(w)
        if len(widths) > 1:
            raise CalibrationError(f"{where}: cuts disagree on width: {sorted(widths)}")


def fit_calibration(acts: dict[int, NDArray[np.float32]]) -> Calibration:
    """PCA per cut. `acts[k]` is `[n_samples, width]` token vectors observed at cut k."""
    means, bases, variances = {}, {}, {}
    for k, x in sorted(acts.items()):
        x64 = np.asarray(x, dtype=np.float64)
        if x64.ndim != 2 or x64.shape[0] < 2 or x64.shape[1] < 1:
            raise CalibrationError(
                f"fit_calibration: acts[{k}] has shape {x64.shape}, expected [n >= 2, width]"
            )
        if not np.isfinite(x64).all():
            raise CalibrationError(f"fit_calibration: acts[{k}] contains NaN or Inf")
        mean = x64.mean(axis=0)
        xc = x64 - mean  # [n, width]
        cov = xc.T @ xc / (x64.shape[0] - 1)  # [width, width]
        evals, evecs = np.linalg.eigh(cov)  # ascending
        order = np.argsort(evals)[::-1]
        means[k] = mean.astype(np.float32)
        bases[k] = np.ascontiguousarray(evecs[:, order], dtype=np.float32)
        variances[k] = np.clip(evals[order], 0.0, None).astype(np.float32)
    cal = Calibration(means, bases, variances)
    cal.validate("fit_calibration")
    return cal
