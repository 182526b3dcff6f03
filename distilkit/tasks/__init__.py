"""Task plug-ins of :func:`distilkit.pipeline.run_recipe` (interface: :mod:`.base`).

A task is chosen by the recipe's ``task:`` key, or, for a saved model, by its config
(encoder-decoder models are seq2seq).
"""
from __future__ import annotations

from distilkit.tasks.base import Task
from distilkit.tasks.classification import ClassificationTask
from distilkit.tasks.seq2seq import Seq2SeqTask

TASKS: dict[str, Task] = {t.name: t for t in (ClassificationTask(), Seq2SeqTask())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task: {name!r} must be one of {sorted(TASKS)}")
    return TASKS[name]


def task_for_config(config) -> Task:
    """The task a saved model belongs to, from its config."""
    return TASKS["seq2seq" if getattr(config, "is_encoder_decoder", False) else "classification"]
