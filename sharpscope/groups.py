"""Two groups of runs compared number by number: each group's mean ± standard error over
its checkpoints (seeds), and the difference with Welch's test and its interval.

The numbers of one checkpoint come from its measure document (losses, accuracies,
worst-case sharpness at each rho, top Hessian eigenvalue, trace) and from its 1-D
curves along several direction draws (the mean rise of the loss over the plotted range,
averaged over the draws), so a landscape's flatness is reported with the spread of the
direction draws folded in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .errors import SharpscopeError
from .stats import summary, welch


def document_numbers(doc: dict[str, Any]) -> dict[str, float]:
    """The scalar results of one measure document, by name (what a table row shows)."""
    numbers: dict[str, float] = {}
    for split in ("train", "test"):
        if doc.get("loss", {}).get(split) is not None:
            numbers[f"{split} loss"] = doc["loss"][split]
        if doc.get("accuracy", {}).get(split) is not None:
            numbers[f"{split} accuracy"] = doc["accuracy"][split]
    for entry in doc.get("sharpness", []):
        numbers[f"sharpness (rho {entry['rho']:g})"] = entry["value"]
    hessian = doc.get("hessian", {})
    if hessian.get("eigenvalues"):
        numbers["top eigenvalue"] = hessian["eigenvalues"][0]
    if hessian.get("trace"):
        numbers["trace"] = hessian["trace"]["value"]
    return numbers


def group_statistics(
    numbers_a: Sequence[dict[str, float]], numbers_b: Sequence[dict[str, float]]
) -> dict[str, dict[str, Any]]:
    """For every quantity both groups have: ``{"a": summary, "b": summary, "difference":
    Welch's test of mean(b) - mean(a) (None unless both groups hold 2 values or more and
    some spread)}``, the summaries and the test as plain dicts."""
    if not numbers_a or not numbers_b:
        raise SharpscopeError("each group needs at least one checkpoint")
    names = [n for n in numbers_a[0] if all(n in d for d in (*numbers_a, *numbers_b))]
    table: dict[str, dict[str, Any]] = {}
    for name in names:
        a = [d[name] for d in numbers_a]
        b = [d[name] for d in numbers_b]
        if not all(math.isfinite(v) for v in (*a, *b)):
            continue
        difference = None
        if len(a) >= 2 and len(b) >= 2:
            try:
                difference = welch(a, b).to_dict()
            except SharpscopeError:  # no spread in either group: no test to report
                difference = None
        table[name] = {
            "a": summary(a).to_dict(),
            "b": summary(b).to_dict(),
            "values_a": list(a),
            "values_b": list(b),
            "difference": difference,
        }
    return table


def format_statistics(table: dict[str, dict[str, Any]], labels: tuple[str, str]) -> list[str]:
    """The statistics as a Markdown table: each group's mean ± s.e. (n), the difference
    B - A with its 95% interval and Welch's p."""
    head = f"| quantity | {labels[0]} | {labels[1]} | {labels[1]} − {labels[0]} [95% CI] | p |"
    lines = [head, "| --- | --- | --- | --- | --- |"]
    for name, row in table.items():
        cells = [_mean_se(row["a"]), _mean_se(row["b"])]
        d = row["difference"]
        if d is None:
            cells += ["-", "-"]
        else:
            cells += [
                f"{d['difference']:+.3g} [{d['low']:+.3g}, {d['high']:+.3g}]",
                f"{d['p']:.2g}",
            ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _mean_se(s: dict[str, Any]) -> str:
    if s["stderr"] is None:
        return f"{s['mean']:.4g} (n=1)"
    return f"{s['mean']:.4g} ± {s['stderr']:.2g} (n={s['n']})"
