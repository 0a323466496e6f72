"""Two-sample tests of an input against the reference profile, corrected for their number.

- Each image feature (and the model's confidence, where it is known): the two-sample
  Kolmogorov-Smirnov test (scipy.stats.ks_2samp). It assumes nothing of the distribution's
  shape, sees a shift of location, spread or shape alike, and its p-value is exact for these
  sample sizes; on features with ties (the tissue fraction of whole-tissue patches is 1.0) it
  is conservative, which only lowers the false-alarm rate.
- The penultimate-layer embeddings: the maximum mean discrepancy with an RBF kernel, bandwidth
  by the median heuristic (the median pairwise distance of the pooled sample), its p-value
  from `permutations` seeded relabellings of the pooled sample (Gretton et al., JMLR 2012).

The p-values are corrected for the number of tests (Holm's step-down, or Bonferroni), so the
chance of any alarm on data from the reference's distribution is at most `alpha`.
scipy is imported where a test runs: `pcam serve` loads this module only with a reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

Correction = Literal["holm", "bonferroni"]
PERMUTATION_BLOCK = 64  # permutations evaluated together (one matrix product)
EXIT_DRIFT = 3  # `pcam drift`: drift found (0: none; 1: bad input; 2: bad params)


@dataclass(frozen=True)
class Finding:
    name: str
    test: str  # "ks" or "mmd"
    statistic: float
    p_value: float
    p_adjusted: float  # after the correction for the number of tests
    drift: bool
    n_reference: int
    n_input: int


@dataclass(frozen=True)
class DriftReport:
    drift: bool
    alpha: float
    correction: str
    n_tests: int
    min_p_value: float
    tests: list[Finding]
    notes: list[str] = field(default_factory=list)
    stain_vector_angles_deg: dict[str, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        rows = [f"{'test':<20} {'kind':<4} {'statistic':>10} {'p':>10} {'p adj.':>10}  drift"]
        for t in self.tests:
            rows.append(
                f"{t.name:<20} {t.test:<4} {t.statistic:>10.4f} {t.p_value:>10.2e} "
                f"{t.p_adjusted:>10.2e}  {'DRIFT' if t.drift else 'no'}"
            )
        verdict = "DRIFT" if self.drift else "no drift"
        rows.append(
            f"{verdict} at alpha {self.alpha} ({self.correction} over {self.n_tests} tests)"
        )
        return "\n".join([*rows, *(f"note: {note}" for note in self.notes)])


def adjusted(p_values: np.ndarray, correction: Correction) -> np.ndarray:
    """p-values adjusted for the number of tests (compare each with alpha)."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    if m == 0:
        return p
    if correction == "bonferroni":
        return np.minimum(p * m, 1.0)
    order = np.argsort(p, kind="stable")
    steps = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    out = np.empty(m)
    out[order] = np.minimum(steps, 1.0)
    return out


def ks_test(reference: np.ndarray, sample: np.ndarray) -> tuple[float, float]:
    from scipy.stats import ks_2samp

    result = ks_2samp(reference, sample)
    return float(result.statistic), float(result.pvalue)


def _squared_distances(a: np.ndarray) -> np.ndarray:
    norms = np.einsum("ij,ij->i", a, a)
    return np.maximum(norms[:, None] + norms[None, :] - 2.0 * (a @ a.T), 0.0)


def mmd_test(
    reference: np.ndarray, sample: np.ndarray, permutations: int, seed: int
) -> tuple[float, float]:
    """(unbiased MMD^2 with an RBF kernel of median-heuristic bandwidth, permutation p-value)."""
    pooled = np.concatenate([reference, sample]).astype(np.float64)
    d2 = _squared_distances(pooled)
    off = d2[np.triu_indices(len(pooled), k=1)]
    bandwidth = float(np.median(off[off > 0])) if np.any(off > 0) else 1.0
    kernel = np.exp(-d2 / bandwidth)
    np.fill_diagonal(kernel, 0.0)  # the unbiased estimate leaves out k(x, x)
    n, m = len(reference), len(sample)

    def mmd2(first: np.ndarray) -> np.ndarray:
        """MMD^2 for each column of `first` (N, P), True where a row is in the first sample."""
        a = first.astype(np.float64)
        b = 1.0 - a
        ka = kernel @ a
        kxx = np.einsum("ip,ip->p", a, ka) / (n * (n - 1))
        kyy = np.einsum("ip,ip->p", b, kernel @ b) / (m * (m - 1))
        kxy = np.einsum("ip,ip->p", b, ka) / (n * m)
        return kxx + kyy - 2 * kxy

    labels = np.zeros(n + m, dtype=bool)
    labels[:n] = True
    observed = float(mmd2(labels[:, None])[0])
    rng = np.random.default_rng(seed)
    exceed = 0
    for start in range(0, permutations, PERMUTATION_BLOCK):
        count = min(PERMUTATION_BLOCK, permutations - start)
        shuffled = np.stack([rng.permutation(labels) for _ in range(count)], axis=1)
        exceed += int((mmd2(shuffled) >= observed).sum())
    return observed, (1 + exceed) / (1 + permutations)


@dataclass(frozen=True)
class Sample:
    """What is tested, for the reference or the input: named 1-D samples (features and the
    confidence) and, optionally, embeddings (N, D)."""

    univariate: dict[str, np.ndarray]
    embeddings: np.ndarray | None = None


def detect(
    reference: Sample,
    sample: Sample,
    alpha: float,
    correction: Correction,
    permutations: int,
    seed: int,
    notes: list[str] | None = None,
) -> DriftReport:
    """Every test the two samples have in common, corrected; `drift` if any adjusted p < alpha."""
    raw: list[tuple[str, str, float, float, int, int]] = []
    for name, values in sample.univariate.items():
        if name in reference.univariate and len(values) > 0:
            ref = reference.univariate[name]
            statistic, p = ks_test(ref, values)
            raw.append((name, "ks", statistic, p, len(ref), len(values)))
    if reference.embeddings is not None and sample.embeddings is not None:
        statistic, p = mmd_test(reference.embeddings, sample.embeddings, permutations, seed)
        raw.append(
            ("embedding", "mmd", statistic, p, len(reference.embeddings), len(sample.embeddings))
        )
    p_adj = adjusted(np.array([r[3] for r in raw]), correction)
    tests = [
        Finding(name, test, statistic, p, float(q), bool(q < alpha), n_ref, n_in)
        for (name, test, statistic, p, n_ref, n_in), q in zip(raw, p_adj, strict=True)
    ]
    return DriftReport(
        drift=any(t.drift for t in tests),
        alpha=alpha,
        correction=correction,
        n_tests=len(tests),
        min_p_value=min((t.p_value for t in tests), default=1.0),
        tests=tests,
        notes=list(notes or []),
    )
