"""distilkit: distil and compress Hugging Face NLP models.

Names are imported lazily so that ``import distilkit`` touches neither CUDA, the network nor
the heavy libraries until something is used.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "DistilConfig": "distilkit.config",
    "DistilTrainer": "distilkit.trainer",
    "compress_": "distilkit.compress.base",
    "finalize_": "distilkit.compress.base",
    "save_compressed": "distilkit.compress.base",
    "load_compressed": "distilkit.compress.base",
    "from_pretrained": "distilkit.compress.base",
    "student_from_teacher": "distilkit.students.init",
    "student_from_config": "distilkit.students.init",
    "load_teacher": "distilkit.teachers",
    "builtin_teacher": "distilkit.finetune",
    "finetune_teacher": "distilkit.finetune",
    "FinetuneConfig": "distilkit.finetune",
    "builtin_dataset": "distilkit.data",
    "Recipe": "distilkit.recipe",
    "QuantizeConfig": "distilkit.compress.quantize",
    "PTQConfig": "distilkit.compress.quantize",
    "CompressionContext": "distilkit.compress.base",
    "LowRankConfig": "distilkit.compress.low_rank",
    "MagnitudeConfig": "distilkit.compress.magnitude",
    "PruneHeadsConfig": "distilkit.compress.prune",
    "PruneLayersConfig": "distilkit.compress.prune",
    "PruneFFNConfig": "distilkit.compress.prune",
    "LSTMProjectionConfig": "distilkit.compress.lstm_projection",
    "build_bilstm_student": "distilkit.students.bilstm",
    "BiLSTMForSequenceClassification": "distilkit.students.bilstm",
    "AugmentConfig": "distilkit.augment",
    "run_recipe": "distilkit.pipeline",
    "attach_logits": "distilkit.teacher_cache",
    "attach_teacher_outputs": "distilkit.teacher_cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'distilkit' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
