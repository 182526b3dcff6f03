"""Seq2seq distillation: T5, BART and Marian teachers and students.

* :mod:`~distilkit.seq2seq.data`: the offline truecasing task built from real sentences,
  seq2seq tokenization (labels padded with -100) and the collator;
* :mod:`~distilkit.seq2seq.tokenizer`: a BPE tokenizer trained here (no pretrained seq2seq
  tokenizer is installable offline);
* :mod:`~distilkit.seq2seq.teacher`: a T5/BART teacher trained from a config, cached;
* :mod:`~distilkit.seq2seq.sequence_kd`: sequence-level distillation on the teacher's cached
  generations;
* :mod:`~distilkit.seq2seq.generate_eval`: BLEU, chrF, exact match and latency by generation;
* ``task: seq2seq`` recipes run through :mod:`distilkit.tasks.seq2seq`.

Token-level distillation (soft targets on decoder logits, hidden-state and Patient-KD losses
on encoder and decoder layers) is :class:`distilkit.DistilTrainer` itself; students are built
with :func:`distilkit.students.init.student_from_teacher`. Names are imported lazily.
"""
from importlib import import_module

_EXPORTS = {
    "truecase_dataset": "distilkit.seq2seq.data",
    "truecase_tokenizer": "distilkit.seq2seq.data",
    "tokenize_seq2seq": "distilkit.seq2seq.data",
    "Seq2SeqCollator": "distilkit.seq2seq.data",
    "seq2seq_collator": "distilkit.seq2seq.data",
    "strip_case_and_punct": "distilkit.seq2seq.data",
    "build_tokenizer": "distilkit.seq2seq.tokenizer",
    "TokenizerSettings": "distilkit.seq2seq.tokenizer",
    "Seq2SeqTeacherSettings": "distilkit.seq2seq.teacher",
    "truecase_teacher": "distilkit.seq2seq.teacher",
    "load_seq2seq_teacher": "distilkit.seq2seq.teacher",
    "SequenceKDSettings": "distilkit.seq2seq.sequence_kd",
    "sequence_kd_dataset": "distilkit.seq2seq.sequence_kd",
    "teacher_generations": "distilkit.seq2seq.sequence_kd",
    "GenerationSettings": "distilkit.seq2seq.generate_eval",
    "GenerationEvalCallback": "distilkit.seq2seq.generate_eval",
    "evaluate_generation": "distilkit.seq2seq.generate_eval",
    "generate_texts": "distilkit.seq2seq.generate_eval",
    "score_texts": "distilkit.seq2seq.generate_eval",
    "compute_metrics_for_generate": "distilkit.seq2seq.generate_eval",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'distilkit.seq2seq' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
