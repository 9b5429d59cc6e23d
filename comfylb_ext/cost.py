"""How long a prompt will run, learned from the prompts that ran before it.  Pure.

Prompts of one workflow differ in a few numbers — steps, width and height, batch size,
seconds — and their run time follows those numbers.  So a prompt's `Shape` is its graph
with the numbers taken out (its key) plus the numbers themselves (its features), seeds
left out; for each key the model keeps the last runs and predicts by least squares over
the features that actually vary between them.  A key never seen gets None.
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict, deque
from typing import Any, Iterator, NamedTuple

RUNS_KEPT = 64     # per workflow
KEYS_KEPT = 256    # workflows remembered
MAX_FEATURES = 6   # varying numbers fitted at most (the first ones, in graph order)
RIDGE = 1e-6       # keeps the fit solvable with fewer runs than features
FEATURE_MAX = 1e12  # larger numbers (and NaN) are not amounts of work: part of the key, not features


class Shape(NamedTuple):
    key: bytes
    features: tuple[float, ...]


def _is_seed(name: str) -> bool:
    return name == "seed" or name.endswith("_seed")  # seed, noise_seed: random, not work


def shape(prompt: dict) -> Shape:
    skeleton: list[Any] = []
    features: list[float] = []
    for node_id in sorted(prompt, key=str):
        node = prompt[node_id]
        if not isinstance(node, dict):
            continue
        inputs: dict = node["inputs"] if isinstance(node.get("inputs"), dict) else {}
        entry: list[Any] = [node_id, node.get("class_type")]
        for name in sorted(inputs):
            value = inputs[name]
            if _is_seed(name):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and -FEATURE_MAX < value < FEATURE_MAX:
                entry.append(name)
                features.append(float(value))
            else:
                entry.append([name, value])
        skeleton.append(entry)
    key = hashlib.blake2b(json.dumps(skeleton, default=str).encode(), digest_size=16).digest()
    return Shape(key, tuple(features))


class Fit(NamedTuple):
    varying: list[int]  # the features that differ between runs
    beta: list[float]   # intercept, then one coefficient per varying feature

    def __call__(self, features: tuple[float, ...]) -> float:
        return max(self.beta[0] + sum(b * features[i] for b, i in zip(self.beta[1:], self.varying)), 0.0)


class CostModel:
    def __init__(self) -> None:
        self._runs: OrderedDict[bytes, deque[tuple[tuple[float, ...], float]]] = OrderedDict()
        self._fits: dict[bytes, Fit] = {}  # made on the first prediction after a run

    def observe(self, s: Shape, seconds: float) -> None:
        runs = self._runs.get(s.key)
        if runs is None:
            runs = self._runs[s.key] = deque(maxlen=RUNS_KEPT)
            if len(self._runs) > KEYS_KEPT:
                self._fits.pop(self._runs.popitem(last=False)[0], None)
        self._runs.move_to_end(s.key)
        runs.append((s.features, seconds))
        self._fits.pop(s.key, None)

    def runs(self) -> Iterator[tuple[Shape, float]]:
        """Every run remembered, oldest workflow first."""
        for key, runs in self._runs.items():
            for features, seconds in runs:
                yield Shape(key, features), seconds

    def predict(self, s: Shape) -> float | None:
        fit = self._fits.get(s.key)
        if fit is None:
            runs = self._runs.get(s.key)
            if not runs:
                return None
            fit = self._fits[s.key] = _fit(runs)
        return fit(s.features)


def _fit(runs: deque[tuple[tuple[float, ...], float]]) -> Fit:
    ys = [y for _, y in runs]
    width = min(len(x) for x, _ in runs)  # one key, one graph: the same length unless malformed
    varying = [i for i in range(width) if len({x[i] for x, _ in runs}) > 1][:MAX_FEATURES]
    if len(varying) > 1 and len(runs) < len(varying) + 3:
        # Too few runs to tell which numbers matter (a colour or a noise level varies
        # too): the one that follows the time best, once five runs can show it.
        varying = [max(varying, key=lambda i: _correlation([x[i] for x, _ in runs], ys))] if len(runs) >= 5 else []
    elif len(runs) < 3:
        varying = []  # two points fit any line
    beta = _least_squares([[1.0] + [x[i] for i in varying] for x, _ in runs], ys) if varying else None
    return Fit(varying, beta) if beta is not None else Fit([], [sum(ys) / len(ys)])


def _correlation(xs: list[float], ys: list[float]) -> float:
    """|Pearson correlation|, 0 where either side is constant."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return abs(sxy) / (sxx * syy) ** 0.5 if sxx and syy else 0.0


def _least_squares(rows: list[list[float]], ys: list[float]) -> list[float] | None:
    """β minimising |Xβ − y|² + RIDGE·|β|², by the normal equations (a handful of columns)."""
    n = len(rows[0])
    a = [[sum(r[i] * r[j] for r in rows) + (RIDGE if i == j else 0.0) for j in range(n)]
         + [sum(r[i] * y for r, y in zip(rows, ys))] for i in range(n)]
    for col in range(n):  # Gauss-Jordan with partial pivoting
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [v - f * w for v, w in zip(a[r], a[col])]
    return [a[i][n] / a[i][i] for i in range(n)]
