"""``DistilConfig``: ``TrainingArguments`` plus the distillation settings, validated early."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Optional, Union

from transformers import TrainingArguments

from distilkit.loss_terms import loss_terms, teacher_needs

LOSS_WEIGHTS = tuple(t.weight for t in loss_terms())
LAYER_STRATEGIES = ("skip", "last")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")


def teacher_torch_dtype(value: Optional[str], field_name: str = "teacher_dtype"):
    """The ``torch.dtype`` a teacher runs inference in: ``None`` (as loaded) or one of
    :data:`TEACHER_DTYPES`; anything else is a one-line ``ValueError``."""
    if value is None:
        return None
    if value not in TEACHER_DTYPES:
        raise ValueError(f"{field_name}: {value!r} is not a teacher dtype; use one of "
                         f"{', '.join(TEACHER_DTYPES)} (bfloat16 halves the teacher's memory "
                         "and time on a GPU), or leave it unset to run the teacher as loaded")
    import torch

    return getattr(torch, value)


def _check_layer_map(name: str, value: Any) -> None:
    if value is None or value in LAYER_STRATEGIES:
        return
    ok = isinstance(value, (list, tuple)) and value and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) and i >= 0 for i in p)
        for p in value)
    if not ok:
        raise ValueError(
            f"{name}: {value!r} is not a layer map; use 'skip', 'last', or a list of "
            "[student_layer, teacher_layer] pairs of layer numbers (1 = first layer, "
            "0 = embeddings), e.g. [[1, 2], [2, 4]]")


# One weight field per registered loss term (alpha_kd: 0.5, alpha_ce: 0.5, the others 0),
# generated from the registry so that a new term needs no edit here.
_LossWeights = make_dataclass(
    "_LossWeights", [(t.weight, float, field(default=t.default, metadata={"help": t.help}))
                     for t in loss_terms()], bases=(TrainingArguments,))
_LossWeights.__module__ = __name__


@dataclass
class DistilConfig(_LossWeights):
    """Training arguments for :class:`~distilkit.DistilTrainer`.

    The total loss is the sum of ``weight * term`` over the terms of
    :mod:`distilkit.loss_terms`, each weight a field here (``alpha_kd`` for the soft-target
    KL, ``alpha_ce`` for the hard-label cross-entropy, ...). A term with weight 0 is not
    computed, and the teacher is only asked for hidden states or attentions when a term with
    a positive weight needs them.
    Layer numbers in layer maps count transformer layers from 1; 0 is the embedding output.
    """

    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature T of the soft-target loss (> 0); the loss is multiplied by T^2."})
    attention_loss_kind: str = field(default="kl", metadata={"help": "'kl' (MiniLM) or 'mse' (TinyBERT)."})
    layer_map: Optional[Union[str, list]] = field(default="skip", metadata={"help": "Encoder layer map for hidden/patient/attention/cosine losses: 'skip', 'last', or [[student, teacher], ...]."})
    decoder_layer_map: Optional[Union[str, list]] = field(default=None, metadata={"help": "Decoder layer map for encoder-decoder models (same forms as layer_map)."})
    teacher_model_name_or_path: Optional[Union[str, list]] = field(default=None, metadata={"help": "Teacher: a local path or hub id, or a list of them for an ensemble."})
    teacher_adapter: Optional[str] = field(default=None, metadata={"help": "A peft adapter (path or hub id) applied on top of the teacher base model."})
    ensemble_weights: Optional[list] = field(default=None, metadata={"help": "Weights of the teachers in an ensemble (default: equal): of their softened distributions for alpha_kd, of their logits for alpha_mse."})
    teacher_dtype: Optional[str] = field(default=None, metadata={"help": "dtype the teacher(s) run inference in: 'float32', 'bfloat16' or 'float16' (default: as loaded). The losses stay fp32 whatever it is."})

    def __post_init__(self):
        super().__post_init__()
        # ``not x > 0`` (rather than ``x <= 0``) also refuses NaN, which compares false.
        if not isinstance(self.temperature, (int, float)) or not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature: {self.temperature!r} must be a finite number > 0 (Hinton et al. use 1-20; try 2.0)")
        for name in LOSS_WEIGHTS:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                raise ValueError(f"{name}: {v!r} must be a number >= 0 (set it to 0 to switch the term off)")
        if all(getattr(self, n) == 0 for n in LOSS_WEIGHTS):
            raise ValueError(f"all loss weights are zero ({', '.join(LOSS_WEIGHTS)}): give at least one a positive weight, e.g. alpha_kd: 1.0")
        if self.attention_loss_kind not in ("kl", "mse"):
            raise ValueError(f"attention_loss_kind: {self.attention_loss_kind!r} must be 'kl' or 'mse'")
        _check_layer_map("layer_map", self.layer_map)
        _check_layer_map("decoder_layer_map", self.decoder_layer_map)
        teacher_torch_dtype(self.teacher_dtype)
        if self.ensemble_weights is not None:
            if any((not isinstance(w, (int, float))) or w < 0 for w in self.ensemble_weights) or sum(self.ensemble_weights) <= 0:
                raise ValueError(f"ensemble_weights: {self.ensemble_weights!r} must be numbers >= 0, not all zero")

    # What the terms with a positive weight read from the teacher (and the student), from
    # the loss-term registry.
    @property
    def needs_hidden_states(self) -> bool:
        return "hidden_states" in teacher_needs(self)

    @property
    def needs_attentions(self) -> bool:
        return "attentions" in teacher_needs(self)

    @property
    def needs_token_states(self) -> bool:
        """Whether a term reads the teacher's per-token states or attention maps, which the
        teacher-output cache does not hold (it keeps logits and [CLS] states)."""
        return "token_states" in teacher_needs(self)


def resolve_layer_map(spec: Optional[Union[str, list]], n_student: int, n_teacher: int,
                      field_name: str = "layer_map") -> list[tuple[int, int]]:
    """Turn a layer-map spec into explicit ``(student_layer, teacher_layer)`` pairs.

    ``skip`` (PKD-Skip) pairs student layer i with teacher layer ``i * n_teacher // n_student``
    and ``last`` (PKD-Last) with the teacher's last layers, both for i = 1 .. n_student - 1:
    the student's final layer is left to the output losses, as in Sun et al. (2019), except for
    a one-layer student, whose only layer is paired with the teacher's last. Explicit pairs are
    checked against both depths.
    """
    if spec is None:
        return []
    if spec == "skip" or spec == "last":
        if n_student > n_teacher:
            raise ValueError(f"{field_name}: {spec!r} needs a student no deeper than the teacher "
                             f"({n_student} > {n_teacher} layers); give explicit pairs")
        if n_student == 1:
            return [(1, n_teacher)]
        if spec == "skip":
            # Multiply before dividing: i * (n_t // n_s) would bunch the pairs at the
            # teacher's bottom when n_s does not divide n_t (4 of 6: 1, 2, 3, not 1, 3, 4).
            return [(i, i * n_teacher // n_student) for i in range(1, n_student)]
        return [(i, n_teacher - n_student + i) for i in range(1, n_student)]
    pairs = [tuple(p) for p in spec]
    for s, t in pairs:
        if not 0 <= s <= n_student:
            raise ValueError(f"{field_name}: student layer {s} in {list(spec)} is outside the "
                             f"student's depth 0..{n_student}")
        if not 0 <= t <= n_teacher:
            raise ValueError(f"{field_name}: teacher layer {t} in {list(spec)} is outside the "
                             f"teacher's depth 0..{n_teacher}")
    return pairs
