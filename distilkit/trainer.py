"""``DistilTrainer``: a ``transformers.Trainer`` that distils one or more teachers into the
model it trains.

The trainer only orchestrates; the math is in :mod:`distilkit.losses`. Per step it runs the
student once and each teacher once (in eval mode, without gradients, prepared by accelerate in
evaluation mode), asking the teacher for hidden states or attentions only when a term with a
positive weight needs them. When the batch already carries the teacher's outputs (columns
``teacher_logits`` / ``teacher_cls_hidden``, or ``teacher_ensemble_logits`` for an ensemble,
from :mod:`distilkit.teacher_cache`) the teacher is not run at all and need not even be
loaded.

Gradient accumulation is exact: every term is a mean over the micro-batch's items, weighted by
the micro-batch's share of the items in the whole accumulated (and, with several processes,
gathered) batch, which is what ``num_items_in_batch`` counts.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from transformers import Trainer

from distilkit import losses as L
from distilkit.config import DistilConfig, resolve_layer_map
from distilkit.teachers import load_teacher

TEACHER_INPUT_KEYS = ("teacher_input_ids", "teacher_attention_mask", "teacher_token_type_ids")
PROJECTIONS_FILE = "distil_projections.safetensors"


def _depths(config) -> tuple[int, int]:
    """(encoder depth, decoder depth) of a transformers config; decoder is 0 for encoders."""
    if getattr(config, "is_encoder_decoder", False):
        enc = getattr(config, "encoder_layers", None) or getattr(config, "num_layers", None)
        dec = getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers", None) or enc
        return int(enc), int(dec)
    return int(getattr(config, "num_hidden_layers", 0) or 0), 0


def _width(config) -> int:
    return int(getattr(config, "hidden_size", None) or getattr(config, "d_model"))


def _streams(out, is_seq2seq: bool, attentions: bool = False) -> dict:
    """The per-layer outputs of a model output, keyed by stack ('encoder' / 'decoder')."""
    if is_seq2seq:
        pre = "attentions" if attentions else "hidden_states"
        return {"encoder": getattr(out, f"encoder_{pre}"), "decoder": getattr(out, f"decoder_{pre}")}
    return {"encoder": out.attentions if attentions else out.hidden_states}


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _base_config(model: nn.Module):
    m = _unwrap(model)
    if hasattr(m, "get_base_model"):  # peft
        m = m.get_base_model()
    return m.config


class DistilTrainer(Trainer):
    """A ``Trainer`` whose loss is the weighted sum of the distillation terms configured in a
    :class:`~distilkit.DistilConfig`; each term is logged as ``loss_<name>``.

    Args:
        model: the student (a ``PreTrainedModel``, a peft model, or any module returning
            ``logits``).
        teacher_model: a model, a local path or hub id, or a list of them (an ensemble whose
            softened distributions are averaged). Defaults to
            ``args.teacher_model_name_or_path``. May be ``None`` when every batch carries cached
            teacher outputs.
        teacher_config: the teacher's config when no teacher is loaded (cached outputs), used
            to size the hidden-state projections and check the layer map.
        args: a :class:`~distilkit.DistilConfig`.
        **kwargs: everything ``Trainer`` takes (datasets, collator, callbacks, ...).
    """

    def __init__(self, model: Optional[nn.Module] = None,
                 teacher_model: Union[nn.Module, str, Sequence, None] = None,
                 args: Optional[DistilConfig] = None, teacher_config: Any = None, **kwargs):
        if args is None or not isinstance(args, DistilConfig):
            raise TypeError("DistilTrainer needs args=DistilConfig(...) (a TrainingArguments "
                            "subclass with the distillation settings)")
        if model is None:
            raise ValueError("DistilTrainer needs the student as model=...")
        spec = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if spec is None:
            specs = []
        elif isinstance(spec, (list, tuple)):
            specs = list(spec)
        else:
            specs = [spec]
        s_cfg = _base_config(model)
        teachers = [t if isinstance(t, nn.Module) else
                    load_teacher(t, adapter=args.teacher_adapter, like=s_cfg) for t in specs]
        if teachers and args.ensemble_weights is not None and len(args.ensemble_weights) != len(teachers):
            raise ValueError(f"ensemble_weights: {len(args.ensemble_weights)} weights for "
                             f"{len(teachers)} teachers; give one weight per teacher")
        if args.needs_attentions:
            for m in [model, *teachers]:
                _use_eager_attention(m)
        self.teacher_config = teachers[0].config if teachers else teacher_config
        self.is_seq2seq = bool(getattr(s_cfg, "is_encoder_decoder", False))
        self.layer_pairs = self._check_compatibility(s_cfg, teachers, args)
        projections = self._build_projections(s_cfg, args)
        super().__init__(model=model, args=args, **kwargs)
        self.loss_is_scaled_for_ga = True
        self.teachers = []
        for t in teachers:
            t.eval()
            t.requires_grad_(False)
            self.teachers.append(self.accelerator.prepare_model(t, evaluation_mode=True))
        self.projections = None
        if projections is not None:
            projections.to(self.args.device)
            self.projections = (self.accelerator.prepare_model(projections)
                                if self.accelerator.num_processes > 1 else projections)
        self._term_totals: dict[str, torch.Tensor] = {}
        self._term_counts = 0

    # ------------------------------------------------------------------ set-up checks
    def _check_compatibility(self, s_cfg, teachers, args) -> dict:
        t_cfg = self.teacher_config
        if t_cfg is None:
            if args.needs_hidden_states or args.needs_attentions or args.alpha_kd or args.alpha_mse:
                # The batches must then carry cached outputs; checked per batch.
                pass
            return {"encoder": [], "decoder": []}
        for i, t in enumerate(teachers):
            c = t.config
            if self.is_seq2seq:
                if (args.alpha_kd or args.alpha_mse) and c.vocab_size != s_cfg.vocab_size:
                    raise ValueError(
                        f"teacher {i} has vocab_size {c.vocab_size} and the student "
                        f"{s_cfg.vocab_size}: token-level losses (alpha_kd, alpha_mse) need one "
                        "vocabulary. Set alpha_kd: 0 and alpha_mse: 0 and use sequence-level "
                        "distillation (the teacher's generations as targets) instead")
            elif getattr(c, "num_labels", None) != getattr(s_cfg, "num_labels", None):
                raise ValueError(f"teacher {i} predicts {c.num_labels} labels and the student "
                                 f"{s_cfg.num_labels}: build the student with "
                                 f"num_labels={c.num_labels}")
        pairs = {"encoder": [], "decoder": []}
        if args.needs_hidden_states or args.needs_attentions:
            s_enc, s_dec = _depths(s_cfg)
            t_enc, t_dec = _depths(t_cfg)
            if s_enc == 0:
                raise ValueError("hidden-state/attention losses need a transformer student with "
                                 "layers; set alpha_hidden, alpha_patient, alpha_attention and "
                                 "alpha_cosine to 0 for this student")
            pairs["encoder"] = resolve_layer_map(args.layer_map, s_enc, t_enc, "layer_map")
            if self.is_seq2seq and args.decoder_layer_map is not None:
                pairs["decoder"] = resolve_layer_map(args.decoder_layer_map, s_dec, t_dec,
                                                     "decoder_layer_map")
            if not pairs["encoder"] and not pairs["decoder"]:
                raise ValueError("layer_map is empty but a layer loss has a positive weight")
            if args.needs_attentions and any(
                    s == 0 or t == 0 for st in pairs.values() for s, t in st):
                raise ValueError("layer_map: layer 0 (embeddings) has no attention map; use "
                                 "layers >= 1 with alpha_attention")
        return pairs

    def _build_projections(self, s_cfg, args) -> Optional[nn.ModuleDict]:
        if not args.alpha_hidden or self.teacher_config is None:
            return None
        s_w, t_w = _width(s_cfg), _width(self.teacher_config)
        if s_w == t_w:
            return None
        return nn.ModuleDict({
            f"{stack}_{s}_{t}": nn.Linear(s_w, t_w)
            for stack, prs in self.layer_pairs.items() for s, t in prs})

    def _set_signature_columns_if_needed(self):
        # Cached teacher outputs and teacher-tokenized inputs are not arguments of the
        # student's forward, but compute_loss needs them: keep them when Trainer drops the
        # columns the model does not take (remove_unused_columns=True, the default).
        super()._set_signature_columns_if_needed()
        extra = ("teacher_logits", "teacher_ensemble_logits", "teacher_cls_hidden", *TEACHER_INPUT_KEYS)
        self._signature_columns += [c for c in extra if c not in self._signature_columns]

    # ------------------------------------------------------------------ optimizer / saving
    def create_optimizer(self, model=None):
        opt = super().create_optimizer(model)
        if self.projections is not None and not getattr(self, "_proj_in_opt", False):
            opt.add_param_group({"params": list(self.projections.parameters()),
                                 "weight_decay": 0.0})
            self._proj_in_opt = True
        return opt

    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.projections is not None and self.args.should_save:
            from safetensors.torch import save_file
            out = output_dir or self.args.output_dir
            sd = {k: v.detach().cpu().contiguous() for k, v in _unwrap(self.projections).state_dict().items()}
            save_file(sd, os.path.join(out, PROJECTIONS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        f = os.path.join(resume_from_checkpoint, PROJECTIONS_FILE)
        if self.projections is not None and os.path.isfile(f):
            from safetensors.torch import load_file
            _unwrap(self.projections).load_state_dict(load_file(f))

    # ------------------------------------------------------------------ the loss
    def _get_num_items_in_batch(self, batch_samples, device):
        n = sum(_count_items(b) for b in batch_samples)
        n = torch.tensor(n, device=device)
        if self.args.world_size > 1:
            n = self.accelerator.gather(n).sum()
        return n

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        cached = {k: inputs.pop(k) for k in [k for k in inputs if k.startswith("teacher_")]}
        if not model.training:
            # Evaluation reports the student's own task loss; the teacher is not run.
            return super().compute_loss(model, inputs, return_outputs, None)
        a = self.args
        want_h, want_att = a.needs_hidden_states, a.needs_attentions
        kw = {}
        if want_h:
            kw["output_hidden_states"] = True
        if want_att:
            kw["output_attentions"] = True
        s_out = model(**inputs, **kw)
        # With only the label loss (e.g. sequence-level distillation on the teacher's
        # generations) no term reads the teacher, so it is not run.
        if a.alpha_kd or a.alpha_mse or want_h or want_att:
            t_outs, t_logits = self._teacher_outputs(inputs, cached, kw)
        else:
            t_outs, t_logits = [], []
        labels = inputs.get("labels")
        s_logits = s_out["logits"] if isinstance(s_out, dict) else s_out.logits
        pos_mask = (labels != -100) if (labels is not None and s_logits.dim() == 3) else None

        terms: dict[str, torch.Tensor] = {}
        if a.alpha_kd:
            if len(t_logits) > 1:
                probs = L.ensemble_soft_targets(t_logits, a.temperature, a.ensemble_weights)
                terms["kd"] = L.soft_target_kl(s_logits, None, a.temperature, pos_mask, teacher_probs=probs)
            else:
                terms["kd"] = L.soft_target_kl(s_logits, t_logits[0], a.temperature, pos_mask)
        if a.alpha_mse:
            t_mean = t_logits[0] if len(t_logits) == 1 else torch.stack(t_logits).mean(0)
            terms["mse"] = L.logit_mse(s_logits, t_mean, pos_mask)
        if a.alpha_ce and labels is not None:
            terms["ce"] = L.hard_ce(s_logits, labels)
        if want_h or want_att:
            terms.update(self._layer_terms(s_out, t_outs, cached, inputs))

        weights = {"kd": a.alpha_kd, "ce": a.alpha_ce, "mse": a.alpha_mse, "hidden": a.alpha_hidden,
                   "patient": a.alpha_patient, "attention": a.alpha_attention, "cosine": a.alpha_cosine}
        if not terms:
            raise ValueError("no loss term applies to this batch: the data has no labels and "
                             "every teacher-based weight is 0")
        loss = sum(weights[k] * v for k, v in terms.items())
        if num_items_in_batch is not None:
            share = _count_items(inputs) / num_items_in_batch
            loss = loss * share * self.accelerator.num_processes
        else:
            loss = loss / self.args.gradient_accumulation_steps
        for k, v in terms.items():
            self._term_totals[k] = self._term_totals.get(k, 0) + v.detach()
        self._term_counts += 1
        return (loss, s_out) if return_outputs else loss

    def _teacher_outputs(self, inputs, cached, kw):
        """Teacher outputs and logits, from the cache columns when the batch carries them and
        no term needs more than they hold; else from the teacher, run now."""
        a = self.args
        live = a.needs_token_states or (a.alpha_patient and "teacher_cls_hidden" not in cached)
        if live and not self.teachers:
            raise ValueError("the hidden-state, attention and cosine losses (and Patient-KD "
                             "without cached [CLS] states) read the teacher's layers, which the "
                             "teacher-output cache does not hold: pass teacher_model=...")
        if live:
            cached = {k: v for k, v in cached.items() if k in TEACHER_INPUT_KEYS}
        if "teacher_ensemble_logits" in cached:  # (B, K, C): one row per teacher
            members = list(cached["teacher_ensemble_logits"].unbind(1))
            w = a.ensemble_weights
            if w is not None and len(w) != len(members):
                raise ValueError(f"ensemble_weights: {len(w)} weights for the {len(members)} "
                                 "teachers in the cached teacher_ensemble_logits; give one "
                                 "weight per teacher")
            return [], members
        if "teacher_logits" in cached:
            return [], [cached["teacher_logits"]]
        if not self.teachers:
            raise ValueError("no teacher is loaded and the batch carries no cached "
                             "'teacher_logits': pass teacher_model=... or use the teacher cache")
        t_inputs = {k[len("teacher_"):]: v for k, v in cached.items() if k in TEACHER_INPUT_KEYS}
        if not t_inputs:
            t_inputs = inputs
        elif "labels" in inputs and self.is_seq2seq:
            t_inputs["labels"] = inputs["labels"]
        outs = []
        with torch.no_grad():
            for i, t in enumerate(self.teachers):
                # Only the first teacher's layers are matched by layer losses.
                outs.append(t(**t_inputs, **(kw if i == 0 else {})))
        return outs, [o.logits for o in outs]

    def _layer_terms(self, s_out, t_outs, cached, inputs) -> dict:
        a = self.args
        terms: dict[str, torch.Tensor] = {}
        s_h = _streams(s_out, self.is_seq2seq) if a.needs_hidden_states else {}
        if "teacher_cls_hidden" in cached and not t_outs:
            if a.alpha_hidden or a.alpha_cosine or a.alpha_attention:
                raise ValueError("the teacher cache holds [CLS] states only; hidden-state, "
                                 "cosine and attention losses need the teacher itself")
            t_cls = cached["teacher_cls_hidden"]
            pairs = self.layer_pairs["encoder"]
            terms["patient"] = L.patient_loss([s_h["encoder"][s][:, 0] for s, _ in pairs],
                                              [t_cls[:, t] for _, t in pairs])
            return terms
        t_h = _streams(t_outs[0], self.is_seq2seq) if a.needs_hidden_states else {}
        s_att = _streams(s_out, self.is_seq2seq, True) if a.needs_attentions else {}
        t_att = _streams(t_outs[0], self.is_seq2seq, True) if a.needs_attentions else {}
        masks = {"encoder": inputs.get("attention_mask"),
                 "decoder": (inputs["labels"] != -100) if "labels" in inputs and self.is_seq2seq else None}
        hid, cos, att = [], [], []
        pat: dict[str, list] = {}
        # Patient-KD compares [CLS] states; encoder-decoder stacks have no [CLS], so every
        # counted token's state is compared (masked in patient_loss).
        pick = (lambda h: h) if self.is_seq2seq else (lambda h: h[:, 0])
        for stack, pairs in self.layer_pairs.items():
            for s, t in pairs:
                m = masks[stack]
                if a.alpha_hidden:
                    proj = None if self.projections is None else _unwrap(self.projections)[f"{stack}_{s}_{t}"]
                    hid.append(L.hidden_mse(s_h[stack][s], t_h[stack][t], proj, m))
                if a.alpha_cosine:
                    cos.append(L.cosine_loss(s_h[stack][s], t_h[stack][t], m))
                if a.alpha_patient:
                    pat.setdefault(stack, []).append((pick(s_h[stack][s]), pick(t_h[stack][t])))
                if a.alpha_attention:
                    if s_att[stack] is None or s_att[stack][s - 1] is None:
                        raise ValueError("the model returned no attention maps; attention losses "
                                         "need attn_implementation='eager'")
                    att.append(L.attention_loss(s_att[stack][s - 1], t_att[stack][t - 1], m,
                                                kind=a.attention_loss_kind))
        if hid:
            terms["hidden"] = sum(hid) / len(hid)
        if cos:
            terms["cosine"] = sum(cos) / len(cos)
        if pat:
            # One Patient-KD term per stack (their token counts differ), summed like the
            # per-layer distances inside each.
            terms["patient"] = sum(
                L.patient_loss([p[0] for p in ps], [p[1] for p in ps],
                               masks[stack] if self.is_seq2seq else None)
                for stack, ps in pat.items())
        if att:
            terms["attention"] = sum(att) / len(att)
        return terms

    def log(self, logs: dict, start_time=None) -> None:
        if self._term_counts and "loss" in logs:
            for k, v in self._term_totals.items():
                logs[f"loss_{k}"] = round(float(v) / self._term_counts, 6)
            self._term_totals, self._term_counts = {}, 0
        super().log(logs, start_time)


def _count_items(batch) -> int:
    """Items a batch contributes to the loss: label positions that count, or examples when the
    data has no labels (a transfer set)."""
    labels = batch.get("labels") if hasattr(batch, "get") else None
    if labels is not None and labels.dim() > 1:  # token-level: the label tokens that count
        return int((labels != -100).sum())
    if labels is not None:  # one item per example, labelled or not (augmented rows use -100)
        return int(labels.shape[0])
    for k in ("input_ids", "teacher_logits", "inputs_embeds"):
        if k in batch:
            return int(batch[k].shape[0])
    raise ValueError(f"cannot count the examples of a batch with keys {sorted(batch)}")


def _use_eager_attention(model: nn.Module) -> None:
    m = _unwrap(model)
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    if getattr(m.config, "_attn_implementation", "eager") == "eager":
        return
    try:
        m.set_attn_implementation("eager")
    except Exception as e:  # a model without an eager path cannot give attention maps
        raise ValueError(f"alpha_attention > 0 needs attention maps, but {type(m).__name__} "
                         f"cannot switch to attn_implementation='eager' ({e}); set "
                         "alpha_attention: 0") from e
