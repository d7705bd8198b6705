"""What a study's numbers say: mean ± sd over seeds, paired differences against the baseline, the decision
rule, whether the test split is large enough to tell the methods apart, and what each method costs.

The rule (docs/study.md): at the decision fraction, a method beats the baseline for a network when the mean of
its per-seed differences (method minus baseline, same seed, so the same data order and initialisation draw)
is larger than their standard deviation, the seed-to-seed spread. A method is recommended when it beats the
baseline for every network of the study; of several, the largest mean gain wins. Otherwise the baseline is
recommended: pretraining did not pay on this data at this compute.

A test split of n images measures a macro F1 near p to about ``sqrt(p (1 - p) / n)``; the difference of two
methods on the same split to about ``sqrt(2 p (1 - p) / n)``. When a gain is smaller than 1.96 times that,
the split cannot separate the methods, and the study says how many test images a gain of that size (at least
``study.min_effect``) would need: ``n >= 2 x 1.96^2 x p (1 - p) / gain^2``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Z = 1.96


@dataclass(frozen=True)
class Summary:
    method: str
    network: str
    fraction: float
    mean: float
    sd: float
    n: int
    test_images: int


@dataclass(frozen=True)
class Paired:
    """One method against the baseline for one network and fraction, seed by seed."""

    method: str
    network: str
    fraction: float
    diffs: Mapping[int, float]  # seed -> method minus baseline
    baseline_mean: float
    test_images: int

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.diffs.values()) if self.diffs else float("nan")

    @property
    def sd(self) -> float:
        return statistics.stdev(self.diffs.values()) if self.n > 1 else float("nan")

    @property
    def passes(self) -> bool | None:
        """The rule: mean gain > seed-to-seed spread; None with fewer than two seeds (no spread to compare)."""
        return None if self.n < 2 else bool(self.mean > 0 and self.mean > self.sd)

    def test_resolution(self) -> float:
        """1.96 standard errors of a difference of macro F1 on this test split (see the module)."""
        p = min(max(self.baseline_mean + self.mean / 2, 0.01), 0.99)
        return Z * math.sqrt(2 * p * (1 - p) / max(self.test_images, 1))

    def images_needed(self, min_effect: float) -> int:
        p = min(max(self.baseline_mean + self.mean / 2, 0.01), 0.99)
        effect = max(abs(self.mean), min_effect)
        return math.ceil(2 * Z**2 * p * (1 - p) / effect**2)

    @property
    def separable(self) -> bool:
        return abs(self.mean) > self.test_resolution()


@dataclass(frozen=True)
class Cost:
    method: str
    seconds: float  # mean pretraining time per run (the epochs' time)
    images_per_second: float | None
    images: int
    epochs: int
    device: str
    collapsed: int  # runs whose embeddings ended collapsed
    runs: int

    def hours(self, epochs: int = 100) -> float | None:
        """Device hours to pretrain ``epochs`` epochs over this dataset at the measured rate."""
        if not self.images_per_second:
            return None
        return epochs * self.images / self.images_per_second / 3600


@dataclass(frozen=True)
class Decision:
    recommended: str
    reason: str
    fraction: float
    baseline: str
    checks: Mapping[str, Mapping[str, Paired]] = field(default_factory=dict)  # method -> network -> paired
    too_small: Sequence[str] = ()  # sentences: where the test split cannot separate the methods

    @property
    def pretrains(self) -> bool:
        return self.recommended != self.baseline


def summarize(results: Iterable[Mapping[str, Any]], metric: str = "macro_f1") -> list[Summary]:
    groups: dict[tuple[str, str, float], list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["method"], r["network"], float(r["label_fraction"])), []).append(r)
    out = []
    for (method, network, fraction), rows in groups.items():
        values = [float(r[metric]) for r in rows]
        out.append(Summary(method, network, fraction, statistics.fmean(values),
                           statistics.stdev(values) if len(values) > 1 else 0.0, len(values),
                           max(int(r.get("test_images", 0)) for r in rows)))
    return out


def paired(results: Sequence[Mapping[str, Any]], baseline: str, metric: str = "macro_f1") -> list[Paired]:
    """Every other method against ``baseline``, per network and fraction, on the seeds both have."""
    by_key = {(r["method"], r["network"], float(r["label_fraction"]), int(r["seed"])): r for r in results}
    out = []
    cells = sorted({(m, n, f) for m, n, f, _ in by_key if m != baseline}, key=lambda k: (k[0], k[1], k[2]))
    for method, network, fraction in cells:
        diffs, base_values, tests = {}, [], []
        for (m, n, f, seed), r in sorted(by_key.items(), key=lambda kv: kv[0][3]):
            if (m, n, f) != (method, network, fraction):
                continue
            base = by_key.get((baseline, network, fraction, seed))
            if base is None:
                continue
            diffs[seed] = float(r[metric]) - float(base[metric])
            base_values.append(float(base[metric]))
            tests.append(int(r.get("test_images", 0)))
        if diffs:
            out.append(Paired(method, network, fraction, diffs, statistics.fmean(base_values), min(tests)))
    return out


def costs(pretrainings: Iterable[Mapping[str, Any]]) -> list[Cost]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for p in pretrainings:
        groups.setdefault(p["method"], []).append(p)
    out = []
    for method, rows in groups.items():
        rates = [float(r["images_per_second"]) for r in rows if r.get("images_per_second")]
        out.append(Cost(method, statistics.fmean(float(r["seconds"]) for r in rows),
                        statistics.fmean(rates) if rates else None, max(int(r["images"]) for r in rows),
                        max(int(r["epochs"]) for r in rows), rows[0].get("device", ""),
                        sum(bool(r.get("collapsed")) for r in rows), len(rows)))
    return out


def decide(pairs: Sequence[Paired], *, methods: Sequence[str], networks: Sequence[str], baseline: str,
           fraction: float, min_effect: float, cost: Mapping[str, Cost] | None = None) -> Decision:
    """The stated rule at ``fraction`` (module docstring): which method to use, and why, in one sentence."""
    where = f"at {fraction * 100:g} % labels"
    at = {(p.method, p.network): p for p in pairs if p.fraction == fraction}
    checks: dict[str, dict[str, Paired]] = {}
    for method in methods:
        if method == baseline:
            continue
        checks[method] = {n: at[(method, n)] for n in networks if (method, n) in at}
    too_small = []
    for method, by_net in checks.items():
        for network, p in by_net.items():
            if not p.passes and not p.separable:
                too_small.append(
                    f"{method} vs {baseline}, {network} {where}: a gain of {p.mean:+.3f} is within "
                    f"the test split's resolution (±{p.test_resolution():.3f} with {p.test_images} test images); "
                    f"telling a gain of {max(abs(p.mean), min_effect):.3f} apart needs about "
                    f"{p.images_needed(min_effect):,} test images")
    if any(p.n < 2 for by_net in checks.values() for p in by_net.values()):
        return Decision(baseline, f"fewer than two seeds: no seed-to-seed spread to compare a gain with, so "
                        f"nothing is recommended over {baseline}; run the study with two or more study.seeds",
                        fraction, baseline, checks, too_small)
    passing = {m: by_net for m, by_net in checks.items()
               if len(by_net) == len(networks) and all(p.passes for p in by_net.values())}
    if not passing:
        best = max(checks, key=lambda m: min((p.mean - p.sd for p in checks[m].values()), default=-1.0),
                   default=None)
        closest = ""
        if best is not None and checks[best]:
            worst = min(checks[best].values(), key=lambda p: p.mean - p.sd)
            closest = (f"; the closest, {best}, gains {worst.mean:+.3f} ± {worst.sd:.3f} for the {worst.network}")
        return Decision(baseline, f"no method's mean gain over {baseline} {where} exceeds the "
                        f"seed-to-seed spread for every network{closest}", fraction, baseline, checks, too_small)

    def gain(m: str) -> float:
        return statistics.fmean(p.mean for p in passing[m].values())

    chosen = max(passing, key=lambda m: (round(gain(m), 6), -(cost[m].seconds if cost and m in cost else 0.0)))
    parts = ", ".join(f"{n} {p.mean:+.3f} ± {p.sd:.3f}" for n, p in passing[chosen].items())
    others = f" (of {len(passing)} methods that pass, the largest mean gain)" if len(passing) > 1 else ""
    return Decision(chosen, f"{chosen} beats {baseline} {where} by more than the seed-to-seed "
                    f"spread for every network ({parts}, paired by seed){others}", fraction, baseline, checks,
                    too_small)
