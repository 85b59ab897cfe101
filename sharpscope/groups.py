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
from .stats import kendall, summary, welch


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
        cells = [mean_se(row["a"]), mean_se(row["b"])]
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


def mean_se(s: dict[str, Any], with_n: bool = True) -> str:
    """A summary dict (:func:`~sharpscope.stats.summary`) as "mean ± s.e. (n=N)"."""
    n = f" (n={s['n']})" if with_n else ""
    if s["stderr"] is None:
        return f"{s['mean']:.4g}{n}"
    return f"{s['mean']:.4g} ± {s['stderr']:.2g}{n}"


def generalization_gap(doc: dict[str, Any]) -> tuple[str, float] | None:
    """What a measure document says of generalization: the accuracy gap (train minus
    test accuracy, the error gap of Jiang et al. 2020) where accuracy is defined, else
    the loss gap (test minus train loss); None without both splits."""
    acc, loss = doc.get("accuracy", {}), doc.get("loss", {})
    if acc.get("train") is not None and acc.get("test") is not None:
        return "accuracy gap (train - test)", acc["train"] - acc["test"]
    if loss.get("train") is not None and loss.get("test") is not None:
        return "loss gap (test - train)", loss["test"] - loss["train"]
    return None


def correlations(documents: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Kendall's tau-b between every sharpness and curvature number of ``documents``
    (one per model of a sweep) and their generalization gap, each with its bootstrap
    95% interval and p-value (:func:`~sharpscope.stats.kendall`); needs 3 models."""
    if len(documents) < 3:
        raise SharpscopeError("a correlation over models needs at least 3 checkpoints")
    gaps = [generalization_gap(d) for d in documents]
    if any(g is None for g in gaps) or len({g[0] for g in gaps}) != 1:  # type: ignore[index]
        raise SharpscopeError("every checkpoint needs train and test numbers of one kind")
    gap_name = gaps[0][0]  # type: ignore[index]
    gap = [g[1] for g in gaps]  # type: ignore[index]
    rows = [document_numbers(d) for d in documents]
    measures = [
        name
        for name in rows[0]
        if not name.endswith(("loss", "accuracy")) and all(name in r for r in rows)
    ]
    table = {}
    for name in measures:
        values = [r[name] for r in rows]
        table[name] = {"values": values, **kendall(values, gap, seed=seed).to_dict()}
    return {"generalization": gap_name, "gaps": gap, "measures": table}


def format_correlations(result: dict[str, Any]) -> str:
    """The correlations as a plain-text table."""
    lines = [
        f"Kendall's tau with the {result['generalization']} over {len(result['gaps'])} models:"
    ]
    for name, r in result["measures"].items():
        lines.append(
            f"  {name:<28} tau {r['tau']:+.3f}  95% CI [{r['low']:+.3f}, {r['high']:+.3f}]"
            f"  p {r['p']:.2g}"
        )
    return "\n".join(lines)
