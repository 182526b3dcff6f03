"""``DistilConfig``: ``TrainingArguments`` plus the distillation settings, validated early."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from transformers import TrainingArguments

LOSS_WEIGHTS = ("alpha_kd", "alpha_ce", "alpha_mse", "alpha_hidden", "alpha_patient",
                "alpha_attention", "alpha_cosine")
LAYER_STRATEGIES = ("skip", "last")


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


@dataclass
class DistilConfig(TrainingArguments):
    """Training arguments for :class:`~distilkit.DistilTrainer`.

    The total loss is ``alpha_kd * L_kd + alpha_ce * L_ce + alpha_mse * L_mse +
    alpha_hidden * L_hidden + alpha_patient * L_patient + alpha_attention * L_attn +
    alpha_cosine * L_cos``; a term with weight 0 is not computed, and the teacher is only asked
    for hidden states or attentions when a term with a positive weight needs them.
    Layer numbers in layer maps count transformer layers from 1; 0 is the embedding output.
    """

    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature T of the soft-target loss (> 0); the loss is multiplied by T^2."})
    alpha_kd: float = field(default=0.5, metadata={"help": "Weight of the soft-target KL loss (Hinton et al. 2015)."})
    alpha_ce: float = field(default=0.5, metadata={"help": "Weight of the hard-label cross-entropy (ignored on data without labels)."})
    alpha_mse: float = field(default=0.0, metadata={"help": "Weight of the logit MSE loss (Tang et al. 2019)."})
    alpha_hidden: float = field(default=0.0, metadata={"help": "Weight of the hidden-state MSE over mapped layers, with a learned projection when widths differ."})
    alpha_patient: float = field(default=0.0, metadata={"help": "Weight (beta) of the Patient-KD loss on normalised [CLS] states (Sun et al. 2019); for encoder-decoder models, on every counted token of the mapped encoder and decoder layers."})
    alpha_attention: float = field(default=0.0, metadata={"help": "Weight of the attention-map loss over mapped layers (needs eager attention; switched on automatically)."})
    alpha_cosine: float = field(default=0.0, metadata={"help": "Weight of the cosine embedding loss on hidden states (DistilBERT)."})
    attention_loss_kind: str = field(default="kl", metadata={"help": "'kl' (MiniLM) or 'mse' (TinyBERT)."})
    layer_map: Optional[Union[str, list]] = field(default="skip", metadata={"help": "Encoder layer map for hidden/patient/attention/cosine losses: 'skip', 'last', or [[student, teacher], ...]."})
    decoder_layer_map: Optional[Union[str, list]] = field(default=None, metadata={"help": "Decoder layer map for encoder-decoder models (same forms as layer_map)."})
    teacher_model_name_or_path: Optional[Union[str, list]] = field(default=None, metadata={"help": "Teacher: a local path or hub id, or a list of them for an ensemble."})
    teacher_adapter: Optional[str] = field(default=None, metadata={"help": "A peft adapter (path or hub id) applied on top of the teacher base model."})
    ensemble_weights: Optional[list] = field(default=None, metadata={"help": "Weights of the teachers' softened distributions in an ensemble (default: equal)."})

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            raise ValueError(f"temperature: {self.temperature!r} must be > 0 (Hinton et al. use 1-20; try 2.0)")
        for name in LOSS_WEIGHTS:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name}: {v!r} must be a number >= 0 (set it to 0 to switch the term off)")
        if all(getattr(self, n) == 0 for n in LOSS_WEIGHTS):
            raise ValueError(f"all loss weights are zero ({', '.join(LOSS_WEIGHTS)}): give at least one a positive weight, e.g. alpha_kd: 1.0")
        if self.attention_loss_kind not in ("kl", "mse"):
            raise ValueError(f"attention_loss_kind: {self.attention_loss_kind!r} must be 'kl' or 'mse'")
        _check_layer_map("layer_map", self.layer_map)
        _check_layer_map("decoder_layer_map", self.decoder_layer_map)
        if self.ensemble_weights is not None:
            if any((not isinstance(w, (int, float))) or w < 0 for w in self.ensemble_weights) or sum(self.ensemble_weights) <= 0:
                raise ValueError(f"ensemble_weights: {self.ensemble_weights!r} must be numbers >= 0, not all zero")

    @property
    def needs_hidden_states(self) -> bool:
        return any(getattr(self, n) > 0 for n in ("alpha_hidden", "alpha_patient", "alpha_cosine"))

    @property
    def needs_attentions(self) -> bool:
        return self.alpha_attention > 0

    @property
    def needs_token_states(self) -> bool:
        """Whether a term reads the teacher's per-token states or attention maps, which the
        teacher-output cache does not hold (it keeps logits and [CLS] states)."""
        return any(getattr(self, n) > 0 for n in ("alpha_hidden", "alpha_attention", "alpha_cosine"))


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
            step = n_teacher // n_student
            return [(i, i * step) for i in range(1, n_student)]
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
