"""The TabDiff evaluation report: report.md (metrics as rows, methods as columns) and report.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# headline metrics first, in the order the TabDiff paper reports them; anything else follows sorted
ORDER = ("column_shape", "pair_trend", "c2st", "c2st_linear", "mle_auc", "mle_auc_real", "mle_r2", "mle_r2_real",
         "dcr_share", "imputation_auc")
HIGHER = "higher"
LOWER = "lower"
HALF = "closer to 0.5"
DIRECTION = {
    "column_shape": HIGHER, "column_shape_numerical": HIGHER, "column_shape_categorical": HIGHER,
    "pair_trend": HIGHER, "pair_trend_correlation": HIGHER, "pair_trend_contingency": HIGHER,
    "c2st": HIGHER, "c2st_linear": HIGHER, "c2st_auc": HALF, "mle_auc": HIGHER, "mle_auc_real": HIGHER,
    "mle_r2": HIGHER, "mle_r2_real": HIGHER, "dcr_share": HALF, "dcr_copies": LOWER, "imputation_auc": HIGHER,
}
MEANING = {
    "column_shape": "1 - KS (numerical) / 1 - TVD (categorical), mean over columns",
    "pair_trend": "1 - |corr diff|/2 (numerical pairs) / contingency similarity, mean over pairs",
    "c2st": "logistic detector with column-pair terms, SDMetrics LogisticDetection score (1 = indistinguishable)",
    "c2st_linear": "the same without pair terms (the paper's C2ST; blind to dependence between columns)",
    "c2st_auc": "the detector's cross-validated ROC AUC",
    "mle_auc": "gradient boosting trained on these rows, ROC AUC on the real test split",
    "mle_auc_real": "the same model trained on the real train split (reference)",
    "pair_trend_correlation": "the numerical-pair part of pair_trend",
    "pair_trend_contingency": "the categorical and mixed-pair part of pair_trend",
    "dcr_share": "share of rows closer to train than to test (L1 DCR; 0.5 = no memorisation)",
    "dcr_copies": "share of rows that are exact copies of a train row",
    "imputation_auc": "ROC AUC of the imputed target against the truth",
    "rows_synthetic": "rows evaluated",
}
CONTEXT_FIRST = ("dataset", "rows", "seed", "step", "command")


def metric_rows(results: dict[str, dict[str, float]]) -> list[str]:
    names = {k for scores in results.values() for k in scores}
    return [k for k in ORDER if k in names] + sorted(names - set(ORDER))


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and abs(value) <= 1:  # scores: same precision in every cell, 1 too
        return f"{value:.4f}"
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _jsonable(value: Any) -> Any:
    """NaN/inf become null (JSON has no NaN); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_report(path: Path, results: dict[str, dict[str, float]], context: dict[str, Any],
                 paper: dict[str, dict[str, float]] | None = None) -> None:
    """Write `path` (markdown) and the same content as JSON beside it (`path` with suffix .json).

    `results` maps a method (e.g. "tabdiff", "independent", "gaussian_copula", "real (train vs test)")
    to its metrics; `context` holds dataset, rows, seed, step, command and anything else worth keeping.
    `paper` (optional): the same methods scored by the paper's protocol (paper_metrics.evaluate_paper),
    written as a second table beside the paper's published numbers.
    """
    path = Path(path)
    if not results:
        raise ValueError(f"write_report({path}) got no results; pass {{method: {{metric: value}}}}")
    path.parent.mkdir(parents=True, exist_ok=True)
    methods = list(results)
    metrics = metric_rows(results)
    lines = [f"# TabDiff evaluation: {context.get('dataset', 'table')}", ""]
    lines += ["| metric | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for metric in metrics:
        lines.append(f"| {metric} | " + " | ".join(_cell(results[m].get(metric)) for m in methods) + " |")
    lines.append("")
    by_direction: dict[str, list[str]] = {}
    for metric in metrics:
        by_direction.setdefault(DIRECTION.get(metric, "informational"), []).append(metric)
    lines.append("Better: " + "; ".join(f"**{d}**: {', '.join(names)}" for d, names in by_direction.items()) + ".")
    if paper:
        from scaleyard.jobs.tabdiff.paper_report import paper_section

        lines += [""] + paper_section(paper, context)
    lines += ["", "## Metrics", ""]
    for metric in metrics:
        meaning = MEANING.get(metric) or MEANING.get(metric.rsplit("_", 1)[0], "")
        part = f" ({metric.rsplit('_', 1)[1]} part)" if metric not in MEANING and meaning else ""
        better = f" ({DIRECTION[metric]} is better)" if metric in DIRECTION else ""
        lines.append(f"- `{metric}`{better}: {meaning or 'see scaleyard.jobs.tabdiff.metrics'}{part}")
    lines += ["", "## Context", ""]
    keys = [k for k in CONTEXT_FIRST if k in context] + [k for k in context if k not in CONTEXT_FIRST]
    for key in keys:
        value = context[key]
        shown = f"`{value}`" if key == "command" else _cell(value) if isinstance(value, float) else value
        lines.append(f"- {key}: {shown}")
    path.write_text("\n".join(lines) + "\n")
    body = {"results": results, "paper_protocol": paper or {}, "context": context,
            "direction": {m: DIRECTION.get(m) for m in metrics}}
    path.with_suffix(".json").write_text(json.dumps(_jsonable(body), indent=1) + "\n")
