"""The registry of distillation loss terms: what the total loss sums.

The training loss is ``sum(args.<weight> * term(step))`` over the registered terms with a
positive weight; each is logged as ``loss_<name>``. A term is one :func:`register` call on a
small adapter that hands one training step's tensors (a :class:`Step`) to the term's pure
function in :mod:`distilkit.losses`. The registration declares everything the rest of the
package reads:

* ``name`` and ``weight``: the ``DistilConfig`` field, which :mod:`distilkit.config`
  generates from this registry (with ``default`` and ``help``);
* ``needs``: what the term reads from the teacher (:data:`NEEDS`). The trainer asks the
  teacher (and the student) for hidden states or attention maps only when a term needs them,
  and runs the teacher at all only when a term needs something. The teacher-output cache
  (:mod:`distilkit.teacher_cache`) holds logits and [CLS] states, so a term that reads
  per-token states (``"token_states"``) always needs the live teacher;
* ``counts``: the items its mean is over (:data:`COUNTS`), so that gradient accumulation
  weights each micro-batch by its share of the term's own items;
* ``title``, ``matches`` and ``citations`` (full reference text): the model card's loss table.

Adding a loss: its pure function in ``losses.py``, one ``@register(...)`` adapter here, a
test. The weight field, the trainer's term, its log key and the card's row follow.
Registering happens when this module is imported, before ``DistilConfig`` is built from it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

from torch import Tensor, nn

from distilkit import losses as L

# What a term may read from the teacher. The cache serves "logits" (as logits) and
# "hidden_states" at the [CLS] position (as cls_hidden), never "attentions" or "token_states".
NEEDS = ("logits", "hidden_states", "attentions", "token_states")
CACHE_SERVES = {"logits": "logits", "hidden_states": "cls_hidden"}
# A token-level teacher cache (distilkit.seq2seq.topk_cache) serves the soft-target KL alone,
# from these batch columns: per target token the teacher's k largest log-probabilities at the
# run's temperature, their ids and the remaining mass (losses.topk_soft_target_kl). It holds
# no full logits, so a logit MSE still needs the live teacher.
TOPK_COLUMNS = {"log_probs": "teacher_topk_log_probs", "ids": "teacher_topk_ids",
                "tail": "teacher_topk_tail"}
TOPK_SERVES = ("kd",)
# What a term's mean is over: every example, or only the examples with a label (-100 marks an
# augmented, label-less row). Token-level (seq2seq) terms all count the label tokens.
COUNTS = ("examples", "labelled")

HINTON = ("Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. NIPS Deep "
          "Learning Workshop 2015. arXiv:1503.02531")
TANG = ("Tang, Lu, Liu, Mou, Vechtomova, Lin. Distilling Task-Specific Knowledge from BERT "
        "into Simple Neural Networks. 2019. arXiv:1903.12136")
PKD = ("Sun, Cheng, Gan, Liu. Patient Knowledge Distillation for BERT Model Compression. "
       "EMNLP 2019. arXiv:1908.09355")
FITNETS = ("Romero, Ballas, Kahou, Chassang, Gatta, Bengio. FitNets: Hints for Thin Deep "
           "Nets. ICLR 2015. arXiv:1412.6550")
TINYBERT = ("Jiao, Yin, Shang, Jiang, Chen, Li, Wang, Liu. TinyBERT: Distilling BERT for "
            "Natural Language Understanding. Findings of EMNLP 2020. arXiv:1909.10351")
MINILM = ("Wang, Wei, Dong, Bao, Yang, Zhou. MiniLM: Deep Self-Attention Distillation for "
          "Task-Agnostic Compression of Pre-Trained Transformers. NeurIPS 2020. "
          "arXiv:2002.10957")
DISTILBERT = ("Sanh, Debut, Chaumond, Wolf. DistilBERT, a distilled version of BERT: "
              "smaller, faster, cheaper and lighter. 2019. arXiv:1910.01108")


@dataclass
class Step:
    """One training step as the terms see it, built by the trainer. Teacher tensors are on
    the student's device. Hidden states and attention maps are keyed by stack (``encoder``,
    and ``decoder`` for encoder-decoder models): hidden states indexed by layer number (0 =
    embeddings), attention maps by layer number - 1, as transformers returns them."""

    args: Any  # the DistilConfig
    student_logits: Tensor
    labels: Optional[Tensor] = None
    token_mask: Optional[Tensor] = None  # (B, T) label tokens that count; token-level only
    teacher_logits: list = field(default_factory=list)  # one tensor per teacher
    teacher_cls: Optional[Tensor] = None  # cached [CLS] states (B, layers + 1, H)
    # cached top-k teacher distribution (log_probs (B, T, k), ids (B, T, k), tail (B, T))
    teacher_topk: Optional[tuple] = None
    student_hidden: dict = field(default_factory=dict)
    teacher_hidden: dict = field(default_factory=dict)  # the first teacher's
    student_attentions: dict = field(default_factory=dict)
    teacher_attentions: dict = field(default_factory=dict)
    layer_pairs: dict = field(default_factory=dict)  # stack -> [(student, teacher) layer]
    layer_masks: dict = field(default_factory=dict)  # stack -> (B, T) positions that count
    projections: Optional[Mapping[str, nn.Module]] = None  # see projection_key
    is_seq2seq: bool = False

    def projection(self, stack: str, s: int, t: int) -> Optional[nn.Module]:
        return None if self.projections is None else self.projections[projection_key(stack, s, t)]

    def pairs(self):
        """``(stack, student layer, teacher layer, mask)`` for every mapped layer pair."""
        return [(stack, s, t, self.layer_masks.get(stack))
                for stack, prs in self.layer_pairs.items() for s, t in prs]


def projection_key(stack: str, s: int, t: int) -> str:
    """Name of the learned student-to-teacher width projection of one layer pair."""
    return f"{stack}_{s}_{t}"


@dataclass(frozen=True)
class LossTerm:
    """One registered term; the module docstring says what reads each field. ``compute`` is
    the adapter: it returns the term's value for a :class:`Step`, or None when the term does
    not apply to the batch (the cross-entropy on data without labels)."""

    name: str
    weight: str
    default: float
    needs: frozenset
    counts: str
    compute: Callable[[Step], Optional[Tensor]]
    title: str
    matches: str
    citations: Union[tuple, Callable[[Mapping], tuple]]
    help: str

    def references(self, settings: Mapping) -> tuple:
        """The full reference texts of this term under ``settings`` (a recipe or config)."""
        return self.citations(settings) if callable(self.citations) else self.citations

    @property
    def uses_layers(self) -> bool:
        """Whether the term matches mapped layers (so it reads ``layer_map``)."""
        return bool(self.needs & {"hidden_states", "attentions"})


_TERMS: dict[str, LossTerm] = {}


def register(name: str, *, weight: str, needs=(), counts: str = "examples",
             default: float = 0.0, title: str, matches: str, citations=(), help: str):
    """Decorator: register ``fn(step) -> scalar or None`` as the loss term ``name``."""
    def deco(fn: Callable[[Step], Optional[Tensor]]):
        if name in _TERMS or any(t.weight == weight for t in _TERMS.values()):
            raise ValueError(f"loss term {name!r} / weight {weight!r} is already registered")
        if not set(needs) <= set(NEEDS) or counts not in COUNTS:
            raise ValueError(f"loss term {name!r}: needs must be some of {NEEDS} and counts "
                             f"one of {COUNTS}")
        # DistilConfig's weight fields are made from the registry when distilkit.config is
        # imported: a later term would have no weight and silently never count.
        if hasattr(sys.modules.get("distilkit.config"), "DistilConfig"):
            raise ValueError(f"loss term {name!r}: register loss terms before distilkit.config "
                             "is imported (DistilConfig's weight fields are made from them)")
        _TERMS[name] = LossTerm(name, weight, default, frozenset(needs), counts, fn, title,
                                matches, citations, help)
        return fn
    return deco


def loss_terms() -> tuple:
    """Every registered term, in registration order (the order of fields, logs and card)."""
    return tuple(_TERMS.values())


def active_terms(args: Any) -> list:
    """The terms with a positive weight in ``args`` (a DistilConfig or a recipe mapping)."""
    get = args.get if isinstance(args, Mapping) else (lambda k, d: getattr(args, k, d))
    return [t for t in loss_terms() if (get(t.weight, 0) or 0) > 0]


def teacher_needs(args: Any) -> frozenset:
    """What the terms with a positive weight read from the teacher (a subset of NEEDS)."""
    return frozenset().union(*(t.needs for t in active_terms(args)))


def needs_live_teacher(args: Any) -> bool:
    """Whether some term reads what the teacher-output cache does not hold (per-token states
    or attention maps): the teacher then runs every step, cache or not."""
    return "token_states" in teacher_needs(args)


def topk_unserved(args: Any) -> list:
    """The positive weights of terms that read the teacher but that a top-k token cache
    (:data:`TOPK_COLUMNS`) cannot serve: with none, the cache alone serves the teacher side."""
    return [t.weight for t in active_terms(args) if t.needs and t.name not in TOPK_SERVES]


def cached_outputs_needed(args: Any) -> tuple:
    """The teacher-cache outputs (``distilkit.teacher_cache`` kinds) that serve the terms:
    ``("logits",)``, or ``("logits", "cls_hidden")`` when a term reads [CLS] states."""
    served = {CACHE_SERVES[n] for t in active_terms(args) if "token_states" not in t.needs
              for n in t.needs if n in CACHE_SERVES}
    return ("logits", "cls_hidden") if "cls_hidden" in served else ("logits",)


# ---------------------------------------------------------------------------- the terms
@register("kd", weight="alpha_kd", default=0.5, needs=("logits",),
          title="soft-target KL (x T^2)", matches="teacher's softened class distribution",
          citations=(HINTON,),
          help="Weight of the soft-target KL loss (Hinton et al. 2015).")
def _kd(step: Step) -> Tensor:
    a = step.args
    if step.teacher_topk is not None:
        return L.topk_soft_target_kl(step.student_logits, *step.teacher_topk, a.temperature,
                                     step.token_mask)
    if len(step.teacher_logits) > 1:
        probs = L.ensemble_soft_targets(step.teacher_logits, a.temperature, a.ensemble_weights)
        return L.soft_target_kl(step.student_logits, None, a.temperature, step.token_mask,
                                teacher_probs=probs)
    return L.soft_target_kl(step.student_logits, step.teacher_logits[0], a.temperature,
                            step.token_mask)


@register("ce", weight="alpha_ce", default=0.5, counts="labelled",
          title="hard-label cross-entropy", matches="the gold labels",
          help="Weight of the hard-label cross-entropy (ignored on data without labels).")
def _ce(step: Step) -> Optional[Tensor]:
    return None if step.labels is None else L.hard_ce(step.student_logits, step.labels)


@register("mse", weight="alpha_mse", needs=("logits",),
          title="logit MSE", matches="teacher's logits", citations=(TANG,),
          help="Weight of the logit MSE loss (Tang et al. 2019); an ensemble's target is "
               "its ensemble_weights-weighted mean logits.")
def _mse(step: Step) -> Tensor:
    target = L.ensemble_logits(step.teacher_logits, step.args.ensemble_weights)
    return L.logit_mse(step.student_logits, target, step.token_mask)


def _mean_over_pairs(step: Step, fn) -> Tensor:
    vals = [fn(stack, s, t, m) for stack, s, t, m in step.pairs()]
    return sum(vals) / len(vals)


@register("hidden", weight="alpha_hidden", needs=("hidden_states", "token_states"),
          title="hidden-state MSE (+ projection)", matches="mapped layers' hidden states",
          citations=(FITNETS, TINYBERT),
          help="Weight of the hidden-state MSE over mapped layers, with a learned projection "
               "when widths differ.")
def _hidden(step: Step) -> Tensor:
    return _mean_over_pairs(step, lambda stack, s, t, m: L.hidden_mse(
        step.student_hidden[stack][s], step.teacher_hidden[stack][t],
        step.projection(stack, s, t), m))


@register("patient", weight="alpha_patient", needs=("hidden_states",),
          title="Patient-KD",
          matches="normalised [CLS] states (seq2seq: token states) of mapped layers",
          citations=(PKD,),
          help="Weight (beta) of the Patient-KD loss on normalised [CLS] states (Sun et al. "
               "2019); for encoder-decoder models, on every counted token of the mapped "
               "encoder and decoder layers.")
def _patient(step: Step) -> Tensor:
    if step.teacher_cls is not None:  # cached [CLS] states, one row per teacher layer
        pairs = step.layer_pairs["encoder"]
        return L.patient_loss([step.student_hidden["encoder"][s][:, 0] for s, _ in pairs],
                              [step.teacher_cls[:, t] for _, t in pairs])
    # Encoder-decoder stacks have no [CLS]: every counted token's state is compared, one
    # term per stack (their token counts differ), summed like the pairs inside each.
    pick = (lambda h: h) if step.is_seq2seq else (lambda h: h[:, 0])
    return sum(L.patient_loss([pick(step.student_hidden[stack][s]) for s, _ in prs],
                              [pick(step.teacher_hidden[stack][t]) for _, t in prs],
                              step.layer_masks.get(stack) if step.is_seq2seq else None)
               for stack, prs in step.layer_pairs.items() if prs)


def _attention_refs(settings: Mapping) -> tuple:
    return (TINYBERT,) if settings.get("attention_loss_kind") == "mse" else (MINILM,)


@register("attention", weight="alpha_attention", needs=("attentions", "token_states"),
          title="attention-map loss", matches="mapped layers' attention distributions",
          citations=_attention_refs,
          help="Weight of the attention-map loss over mapped layers (needs eager attention; "
               "switched on automatically).")
def _attention(step: Step) -> Tensor:
    def one(stack, s, t, m):
        s_att, t_att = step.student_attentions.get(stack), step.teacher_attentions.get(stack)
        if s_att is None or t_att is None or s_att[s - 1] is None or t_att[t - 1] is None:
            raise ValueError("the model returned no attention maps; attention losses need "
                             "attn_implementation='eager'")
        return L.attention_loss(s_att[s - 1], t_att[t - 1], m, kind=step.args.attention_loss_kind)
    return _mean_over_pairs(step, one)


@register("cosine", weight="alpha_cosine", needs=("hidden_states", "token_states"),
          title="cosine embedding loss", matches="mapped layers' hidden-state directions",
          citations=(DISTILBERT,),
          help="Weight of the cosine embedding loss on hidden states (DistilBERT).")
def _cosine(step: Step) -> Tensor:
    return _mean_over_pairs(step, lambda stack, s, t, m: L.cosine_loss(
        step.student_hidden[stack][s], step.teacher_hidden[stack][t], m))
