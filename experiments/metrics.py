"""GLUE-style metrics from predictions and labels."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef


def compute_metrics(kind: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """accuracy | accuracy_f1 (MRPC, QQP) | matthews (CoLA) | pearson_spearman (STS-B regression)."""
    if kind == "pearson_spearman":
        preds = predictions.reshape(-1)
        if np.std(preds) == 0 or np.std(labels) == 0:  # constant output: correlation undefined
            return {"pearson": float("nan"), "spearman": float("nan")}
        return {"pearson": float(pearsonr(preds, labels)[0]), "spearman": float(spearmanr(preds, labels)[0])}
    classes = predictions.argmax(-1)
    out = {"accuracy": float((classes == labels).mean())}
    if kind == "accuracy_f1":
        out["f1"] = float(f1_score(labels, classes))
    elif kind == "matthews":
        out["matthews"] = float(matthews_corrcoef(labels, classes))
    return out
