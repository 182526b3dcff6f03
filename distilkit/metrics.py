"""Task metrics that work offline (``evaluate.load`` needs the Hub): accuracy and macro-F1."""
from __future__ import annotations

import numpy as np


def accuracy_f1(preds, labels) -> dict:
    """Accuracy and macro-averaged F1 of integer predictions against integer labels."""
    preds, labels = np.asarray(preds).reshape(-1), np.asarray(labels).reshape(-1)
    keep = labels != -100
    preds, labels = preds[keep], labels[keep]
    if labels.size == 0:
        raise ValueError("no labelled examples to score")
    acc = float((preds == labels).mean())
    f1s = []
    for c in np.union1d(np.unique(labels), np.unique(preds)):
        tp = float(((preds == c) & (labels == c)).sum())
        fp = float(((preds == c) & (labels != c)).sum())
        fn = float(((preds != c) & (labels == c)).sum())
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "macro_f1": float(np.mean(f1s))}


def classification_metrics(eval_pred) -> dict:
    """``compute_metrics`` for ``Trainer``: takes an ``EvalPrediction``."""
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    return accuracy_f1(np.argmax(logits, axis=-1), eval_pred.label_ids)
