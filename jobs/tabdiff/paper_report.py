"""The paper-protocol part of report.md: this run's paper metrics per method, beside the numbers the
TabDiff paper publishes for Adult, each row marked comparable or not (issue #17 item 4)."""

from __future__ import annotations

import math
from typing import Any

# metric key -> (column title, how the paper prints it)
COLUMNS = (
    ("shape_error_pct", "shape error %"), ("trend_error_pct", "trend error %"), ("c2st", "C2ST"),
    ("alpha_precision", "alpha-precision"), ("beta_recall", "beta-recall"), ("mle_auc", "MLE AUC"),
    ("dcr", "DCR (strictly closer to train)"), ("imputation_auc", "imputation AUC"),
    ("c2st_pairs", "C2ST with pair features (ours)"),
)
# The paper's published Adult numbers (arXiv 2410.20626, ICLR 2025), by method. Left empty: no
# metric for Adult could be read from the paper itself in the sources this project can reach, and
# numbers quoted from memory or from third-party summaries would not be checkable. Checked:
# - the stored arXiv HTML of v1 and v3 (arxiv.org/html/2410.20626v1, .../v3): only the start of each
#   page is stored (title, abstract, start of the introduction); none of the result tables;
# - mirrors and summaries of the paper (alphaxiv, chatpaper, liner, paperhub/OpenReview): same, or
#   reviews without the tables;
# - the reference code, github.com/MinkaiXu/TabDiff at 5ecdb33 (2025-06-02): its README and code
#   publish no result numbers.
# To fill: take each {metric: value} from the paper's result tables (shape/trend error %,
# alpha-precision, beta-recall, C2ST detection, MLE AUC, DCR) in the units COLUMNS names, and name the
# arXiv version and table beside each number.
PAPER_ADULT: dict[str, dict[str, float]] = {"TabDiff": {}, "TabSyn": {}, "TabDDPM": {}, "CTGAN": {}, "TVAE": {}}
# our method name -> the paper's method it stands beside
COUNTERPART = {"tabdiff": "TabDiff"}


def comparability(method: str, context: dict[str, Any]) -> tuple[str, str]:
    """(yes / partly / no, the reason) for one of our rows against the paper's protocol."""
    if method not in COUNTERPART:
        return "no", "not a method of the paper (a reference point of this project)"
    blocking = []  # each of these alone makes the row a different experiment
    steps, batch = context.get("step"), context.get("batch_size")
    if steps and batch and steps * batch < 0.5 * 64_000 * 4096:
        blocking.append(f"trained {steps} steps x batch {batch} (paper: ~64k x 4096)")
    if context.get("model_deviations"):
        blocking.append("denoiser or loss deviates from the reference: " + context["model_deviations"])
    caveats = ["EMA and LR schedule per step (reference: per epoch)",
               "DCR: the paper trains a separate model on a 50/50 split; here train and test pools are the "
               "standard split's", "one sample and one seed (the paper averages 20 samples)",
               f"imputation: {context.get('impute', '?')} (paper: 50 trials over the whole test split)"]
    return ("no" if blocking else "partly"), "; ".join(blocking + caveats)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}" if abs(value) > 1 else f"{value:.4f}"


def paper_section(results: dict[str, dict[str, float]], context: dict[str, Any]) -> list[str]:
    """Markdown lines: our rows (paper protocol) and the paper's rows, one table."""
    head = "| source | method | " + " | ".join(title for _, title in COLUMNS) + " | comparable | why |"
    lines = ["## The paper's protocol, beside the paper's Adult numbers", "",
             "Fidelity (shape, trend, C2ST, alpha/beta) against the train split, MLE (XGBoost, the reference's "
             "grid tuned on a 1/9 split of the synthetic rows) and DCR on the test split, as the reference code "
             "computes them (scaleyard.jobs.tabdiff.paper_metrics); imputation AUC from the classes drawn by repeated "
             "imputations of the target, as `eval_impute.py`. The ceiling row is half the real test split "
             "scored as if it were synthetic (its other half is its MLE/DCR test set).", "",
             head, "|" + "---|" * (len(COLUMNS) + 4)]
    for method, scores in results.items():
        verdict, why = comparability(method, context)
        cells = " | ".join(_cell(scores.get(key)) for key, _ in COLUMNS)
        lines.append(f"| this run | {method} | {cells} | {verdict} | {why} |")
    for method, scores in PAPER_ADULT.items():
        cells = " | ".join(_cell(scores.get(key)) for key, _ in COLUMNS)
        why = "published" if scores else "numbers not filled in: see PAPER_ADULT in paper_report.py"
        lines.append(f"| paper | {method} | {cells} | - | {why} |")
    lines.append("")
    return lines
