"""``DistilTrainer``: a ``transformers.Trainer`` that distils one or more teachers into the
model it trains.

The trainer only orchestrates; the terms and their math are in :mod:`distilkit.loss_terms`
and :mod:`distilkit.losses`. Per step it runs the student once and each teacher once (in
eval mode, without gradients, prepared by accelerate in evaluation mode or, under FSDP2 or
DeepSpeed ZeRO-3, sharded for inference by :mod:`distilkit.sharding`; fed on its own device),
asking for hidden states or attentions only when a term with a positive weight needs them.
Neither model is given the ``labels``: every term, the hard-label cross-entropy included, is
computed here, so a model's built-in loss (for a seq2seq teacher, a
full-vocabulary cross-entropy per token) would be work thrown away. Encoder-decoder models get
the ``decoder_input_ids`` they would have derived from the labels, derived once. When the
batch already carries the teacher's outputs (columns ``teacher_logits`` /
``teacher_cls_hidden``, or ``teacher_ensemble_logits`` for an ensemble, from
:mod:`distilkit.teacher_cache`; for token-level KD the top-k columns ``teacher_topk_*`` of
:mod:`distilkit.seq2seq.topk_cache`) and no term needs more than they hold, the teacher is not run
at all and need not even be loaded.

Gradient accumulation is exact: every term is a mean over its own items in the micro-batch
(examples, or labelled examples for the cross-entropy; label tokens for token-level terms),
weighted by the micro-batch's share of those items in the whole accumulated (and, with several
processes, gathered) batch.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from transformers import Trainer

from distilkit.compress.base import unwrap
from distilkit.config import DistilConfig, resolve_layer_map, teacher_torch_dtype
from distilkit.device import model_device, to_device
from distilkit.loss_terms import (COUNTS, TOPK_COLUMNS, TOPK_SERVES, Step, active_terms,
                                  projection_key, teacher_needs, topk_unserved)
from distilkit.teacher_cache import COLUMN, ENSEMBLE_COLUMN
from distilkit.teachers import load_teacher

TEACHER_INPUT_KEYS = ("teacher_input_ids", "teacher_attention_mask", "teacher_token_type_ids")
# Every batch column the trainer reads besides the student's inputs: cached teacher outputs and
# teacher-tokenized inputs. Any other ``teacher_*`` column is a mistake (e.g. a misspelling).
TEACHER_COLUMNS = (*COLUMN.values(), ENSEMBLE_COLUMN, *TOPK_COLUMNS.values(), *TEACHER_INPUT_KEYS)
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


def _base_config(model: nn.Module):
    return unwrap(model).config


def _columns(dataset) -> Optional[list]:
    """The column names of a dataset when they can be known without reading it."""
    cols = getattr(dataset, "column_names", None)
    if isinstance(cols, list):
        return cols
    if isinstance(dataset, (list, tuple)) and dataset and isinstance(dataset[0], dict):
        return list(dataset[0])
    return None


class DistilTrainer(Trainer):
    """A ``Trainer`` whose loss is the weighted sum of the loss terms
    (:mod:`distilkit.loss_terms`) with a positive weight in a :class:`~distilkit.DistilConfig`;
    each term is logged as ``loss_<name>``.

    Args:
        model: the student (a ``PreTrainedModel``, a peft model, or any module returning
            ``logits``).
        teacher_model: a model, a local path or hub id, or a list of them (an ensemble whose
            softened distributions are averaged). Defaults to
            ``args.teacher_model_name_or_path``. May be ``None`` when the training data
            carries cached teacher outputs that serve every term.
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
        _check_teacher_columns(kwargs.get("train_dataset"))
        s_cfg = _base_config(model)
        teachers = [t if isinstance(t, nn.Module) else
                    load_teacher(t, adapter=args.teacher_adapter, like=s_cfg) for t in specs]
        if not teachers:
            _check_served_without_teacher(args, kwargs.get("train_dataset"), teacher_config)
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
        # Whether the teachers are split across the processes: their forwards are then
        # collectives, which every process must run together (evaluation included).
        self.teacher_sharded = False
        t_dtype = teacher_torch_dtype(args.teacher_dtype)
        for t in teachers:
            t.eval()
            t.requires_grad_(False)
            if getattr(self.accelerator, "is_fsdp2", False) and self.accelerator.num_processes > 1:
                # FSDP2: sharded across the processes for inference (distilkit.sharding).
                from distilkit.sharding import shard_for_accelerator
                self.teachers.append(shard_for_accelerator(t, self.accelerator, t_dtype))
                self.teacher_sharded = True
                continue
            ds = getattr(self.accelerator.state, "deepspeed_plugin", None)
            if ds is not None and ds.zero_stage == 3 and self.accelerator.num_processes > 1:
                # ZeRO-3: partitioned across the processes for inference (distilkit.sharding).
                from distilkit.sharding import zero3_teacher
                self.teachers.append(zero3_teacher(t, self.accelerator, t_dtype))
                self.teacher_sharded = True
                continue
            # Else replicated: accelerate in evaluation mode never wraps it in DDP (it has
            # no gradients to reduce). Under FSDP it does not place models itself.
            t = self.accelerator.prepare_model(t, evaluation_mode=True)
            if self.is_fsdp_enabled:
                t.to(self.accelerator.device)
            if t_dtype is not None:
                # Cast once, after accelerate has placed it: the teacher only infers, and every
                # loss upcasts its outputs to fp32 (distilkit.losses).
                t.to(t_dtype)
            self.teachers.append(t)
        self.projections = None
        if projections is not None:
            projections.to(self.args.device)
            self.projections = (self.accelerator.prepare_model(projections)
                                if self.accelerator.num_processes > 1 else projections)
        self._term_totals: dict[str, torch.Tensor] = {}
        self._term_counts = 0
        # (the count _get_num_items_in_batch returned, {count kind: count}) of the current
        # accumulated batch: each term's weight is its own items' share.
        self._batch_items: Optional[tuple] = None

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and self.accelerator.num_processes == 1:
            # accelerate finds no backend for CPU processes not told use_cpu: each would train
            # alone on all the data (and a sharded teacher would be whole on each).
            raise ValueError(f"use_cpu: launched as {world} processes but they were not joined "
                             "(no GPU, and use_cpu is false); set use_cpu: true to join them "
                             "in one CPU (gloo) group")
        from distilkit.sharding import engine_on_cpu

        # An FSDP / DeepSpeed launch on CPU processes: accelerate drops the plugin there;
        # given back (distilkit.sharding.engine_on_cpu), so the student and the teacher are
        # sharded as they are on GPUs.
        kind = engine_on_cpu(self.accelerator, self.args.fsdp_plugin_args)
        if kind == "fsdp":
            self.is_fsdp_enabled = True
        elif kind == "deepspeed":
            from transformers.integrations.deepspeed import propagate_args_to_deepspeed

            self.is_deepspeed_enabled = True
            propagate_args_to_deepspeed(self.accelerator, self.args)

    # ------------------------------------------------------------------ set-up checks
    def _check_compatibility(self, s_cfg, teachers, args) -> dict:
        t_cfg = self.teacher_config
        if t_cfg is None:
            return {"encoder": [], "decoder": []}
        logit_weights = ", ".join(t.weight for t in active_terms(args) if "logits" in t.needs)
        for i, t in enumerate(teachers):
            c = t.config
            if self.is_seq2seq:
                if logit_weights and c.vocab_size != s_cfg.vocab_size:
                    raise ValueError(
                        f"teacher {i} has vocab_size {c.vocab_size} and the student "
                        f"{s_cfg.vocab_size}: token-level losses ({logit_weights}) need one "
                        "vocabulary. Set them to 0 and use sequence-level distillation (the "
                        "teacher's generations as targets) instead")
            elif getattr(c, "num_labels", None) != getattr(s_cfg, "num_labels", None):
                raise ValueError(f"teacher {i} predicts {c.num_labels} labels and the student "
                                 f"{s_cfg.num_labels}: build the student with "
                                 f"num_labels={c.num_labels}")
        pairs = {"encoder": [], "decoder": []}
        if args.needs_hidden_states or args.needs_attentions:
            s_enc, s_dec = _depths(s_cfg)
            t_enc, t_dec = _depths(t_cfg)
            layer_weights = ", ".join(t.weight for t in active_terms(args) if t.uses_layers)
            if s_enc == 0:
                raise ValueError(f"hidden-state/attention losses ({layer_weights}) need a "
                                 "transformer student with layers; set them to 0 for this student")
            pairs["encoder"] = resolve_layer_map(args.layer_map, s_enc, t_enc, "layer_map")
            if self.is_seq2seq and args.decoder_layer_map is not None:
                pairs["decoder"] = resolve_layer_map(args.decoder_layer_map, s_dec, t_dec,
                                                     "decoder_layer_map")
            if not pairs["encoder"] and not pairs["decoder"]:
                raise ValueError(f"layer_map is empty but a layer loss ({layer_weights}) has a "
                                 "positive weight")
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
            projection_key(stack, s, t): nn.Linear(s_w, t_w)
            for stack, prs in self.layer_pairs.items() for s, t in prs})

    def _set_signature_columns_if_needed(self):
        # Cached teacher outputs and teacher-tokenized inputs are not arguments of the
        # student's forward, but compute_loss needs them: keep them when Trainer drops the
        # columns the model does not take (remove_unused_columns=True, the default).
        super()._set_signature_columns_if_needed()
        self._signature_columns += [c for c in TEACHER_COLUMNS if c not in self._signature_columns]

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
            sd = {k: v.detach().cpu().contiguous() for k, v in unwrap(self.projections).state_dict().items()}
            save_file(sd, os.path.join(out, PROJECTIONS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        f = os.path.join(resume_from_checkpoint, PROJECTIONS_FILE)
        if self.projections is not None and os.path.isfile(f):
            from safetensors.torch import load_file
            unwrap(self.projections).load_state_dict(load_file(f))

    # ------------------------------------------------------------------ the loss
    def _get_num_items_in_batch(self, batch_samples, device):
        """The accumulated batch's items of every count kind (:data:`COUNTS`), gathered over
        processes, kept for compute_loss; returns the examples (label tokens when
        token-level), the count Trainer expects. All tensors: no host sync."""
        per_batch = [_count_items(b) for b in batch_samples]
        zero = torch.zeros((), dtype=torch.long, device=device)
        n = torch.stack([sum((torch.as_tensor(c[k], device=device) for c in per_batch), zero)
                         for k in COUNTS])
        if self.args.world_size > 1:
            n = self.accelerator.gather(n[None]).sum(0)
        counts = dict(zip(COUNTS, n.unbind()))
        self._batch_items = (counts["examples"], counts)
        return counts["examples"]

    def _shares(self, batch: dict, num_items_in_batch) -> Optional[dict]:
        """Each count kind's share of the accumulated batch held by this micro-batch (times
        the processes, whose gradients DDP averages); None outside the training loop."""
        if num_items_in_batch is None:
            return None
        if self._batch_items is not None and self._batch_items[0] is num_items_in_batch:
            totals = self._batch_items[1]
        else:  # a count from elsewhere: it stands for every kind
            totals = dict.fromkeys(COUNTS, num_items_in_batch)
        mine, p = _count_items(batch), self.accelerator.num_processes
        return {k: mine[k] * p / (totals[k].clamp_min(1) if torch.is_tensor(totals[k])
                                  else max(totals[k], 1)) for k in COUNTS}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        cached = {k: inputs.pop(k) for k in [k for k in inputs if k.startswith("teacher_")]}
        if not model.training:
            # Evaluation reports the student's own task loss (eval_loss, through Trainer's
            # prediction_step); the teacher is not run.
            return super().compute_loss(model, inputs, return_outputs, None)
        a = self.args
        terms, needs = active_terms(a), teacher_needs(a)
        # The labels are read by distilkit's terms only; a model given them would compute
        # its own loss beside them, for nothing.
        labels = inputs.pop("labels", None)
        decoder_inputs = None
        if self.is_seq2seq and labels is not None and "decoder_input_ids" not in inputs:
            decoder_inputs = _DecoderInputs(labels)
            inputs["decoder_input_ids"] = decoder_inputs.for_model(model)
        kw = {}
        if "hidden_states" in needs:
            kw["output_hidden_states"] = True
        if "attentions" in needs:
            kw["output_attentions"] = True
        s_out = model(**inputs, **kw)
        s_logits = s_out["logits"] if isinstance(s_out, dict) else s_out.logits
        token_level = labels is not None and s_logits.dim() == 3
        step = Step(
            args=a, student_logits=s_logits, labels=labels,
            token_mask=(labels != -100) if token_level else None,
            layer_pairs=self.layer_pairs, is_seq2seq=self.is_seq2seq,
            layer_masks={"encoder": inputs.get("attention_mask"),
                         "decoder": (labels != -100) if token_level and self.is_seq2seq else None},
            projections=None if self.projections is None else unwrap(self.projections))
        if "hidden_states" in needs:
            step.student_hidden = _streams(s_out, self.is_seq2seq)
        if "attentions" in needs:
            step.student_attentions = _streams(s_out, self.is_seq2seq, True)
        # With only the label loss (e.g. sequence-level distillation on the teacher's
        # generations) no term reads the teacher, so it is not run.
        if needs:
            self._teacher_side(step, needs, inputs, cached, kw, decoder_inputs)

        values = {t.name: v for t in terms if (v := t.compute(step)) is not None}
        if not values:
            raise ValueError("no loss term applies to this batch: the data has no labels and "
                             "every teacher-based weight is 0")
        # Each term weighted by its micro-batch's share of its own items (CE: the labelled
        # rows) in the accumulated batch; called outside the training loop, plain means.
        shares = self._shares({**inputs, "labels": labels}, num_items_in_batch)
        if shares is None:
            shares = dict.fromkeys(COUNTS, 1 / self.args.gradient_accumulation_steps)
        loss = sum(getattr(a, t.weight) * values[t.name] * shares[t.counts]
                   for t in terms if t.name in values)
        for k, v in values.items():
            self._term_totals[k] = self._term_totals.get(k, 0) + v.detach()
        self._term_counts += 1
        self._last_terms = {k: v.detach() for k, v in values.items()}
        return (loss, s_out) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # One host sync per step, as Trainer's own NaN filter already makes; that filter
        # would quietly replace a NaN loss by the running mean and train on garbage.
        if not bool(torch.isfinite(loss).all()):
            raise NonFiniteLossError(self._non_finite_message(loss))
        return loss

    def _non_finite_message(self, loss) -> str:
        terms = ", ".join(f"loss_{k}={float(v):.4g}" for k, v in
                          getattr(self, "_last_terms", {}).items())
        a = self.args
        return (f"training stopped: the loss is {float(loss)} at step {self.state.global_step + 1}"
                f"{f' ({terms})' if terms else ''}; no student was saved. Likely causes: a "
                f"learning rate too high (learning_rate={a.learning_rate}: try it 10x smaller), "
                f"a temperature near 0 (temperature={a.temperature}), fp16 overflow (use bf16 or "
                "fp32), or NaN/inf in the inputs or cached teacher outputs")

    def _teacher_side(self, step: Step, needs, inputs, cached, kw, decoder_inputs) -> None:
        """Fill ``step``'s teacher fields: from the cache columns when the batch carries them
        and they serve every term; else from the teachers, run now on their own devices, with
        the results moved to the student's."""
        has_logits = ENSEMBLE_COLUMN in cached or COLUMN["logits"] in cached
        has_cls = COLUMN["cls_hidden"] in cached
        # A top-k token cache holds no full logits: it serves the soft-target KL alone.
        topk = (not has_logits and TOPK_COLUMNS["ids"] in cached
                and not topk_unserved(self.args))
        live = ("token_states" in needs or ("logits" in needs and not (has_logits or topk))
                or ("hidden_states" in needs and not has_cls))
        if not live and topk:
            step.teacher_topk = tuple(cached[TOPK_COLUMNS[k]] for k in ("log_probs", "ids", "tail"))
            return
        if not live:
            if ENSEMBLE_COLUMN in cached:  # (B, K, C): one row per teacher
                members = list(cached[ENSEMBLE_COLUMN].unbind(1))
                w = self.args.ensemble_weights
                if w is not None and len(w) != len(members):
                    raise ValueError(f"ensemble_weights: {len(w)} weights for the {len(members)} "
                                     f"teachers in the cached {ENSEMBLE_COLUMN}; give one "
                                     "weight per teacher")
                step.teacher_logits = members
            elif has_logits:
                step.teacher_logits = [cached[COLUMN["logits"]]]
            step.teacher_cls = cached.get(COLUMN["cls_hidden"])
            return
        if not self.teachers:
            have = [k for k in cached if k in TEACHER_COLUMNS]
            raise ValueError(_unserved_message(_unserved(self.args, have), have))
        t_inputs = ({k[len("teacher_"):]: v for k, v in cached.items() if k in TEACHER_INPUT_KEYS}
                    or inputs)
        dev = step.student_logits.device
        outs = []
        with torch.no_grad():
            for i, t in enumerate(self.teachers):
                x = dict(t_inputs)
                if "decoder_input_ids" in inputs:  # the teacher's own, if its tokens differ
                    x["decoder_input_ids"] = (inputs["decoder_input_ids"] if decoder_inputs is None
                                              else decoder_inputs.for_model(t))
                # Only the first teacher's layers are matched by layer losses.
                outs.append(t(**to_device(x, model_device(t)), **(kw if i == 0 else {})))
        step.teacher_logits = [to_device(o.logits, dev) for o in outs]
        if "hidden_states" in needs:
            step.teacher_hidden = to_device(_streams(outs[0], self.is_seq2seq), dev)
        if "attentions" in needs:
            step.teacher_attentions = to_device(_streams(outs[0], self.is_seq2seq, True), dev)

    def log(self, logs: dict, start_time=None) -> None:
        if self._term_counts and "loss" in logs:
            for k, v in self._term_totals.items():
                logs[f"loss_{k}"] = round(float(v) / self._term_counts, 6)
            self._term_totals, self._term_counts = {}, 0
        super().log(logs, start_time)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the run stops at that step."""


class _DecoderInputs:
    """An encoder-decoder step's ``decoder_input_ids``: the labels shifted right, as each model
    would derive them itself when given ``labels`` (its ``prepare_decoder_input_ids_from_labels``),
    derived once for all the models that share a decoder start and pad token."""

    def __init__(self, labels: torch.Tensor):
        self.labels = labels
        self._by_tokens: dict = {}

    def for_model(self, model: nn.Module) -> torch.Tensor:
        m = unwrap(model)
        key = (getattr(m.config, "decoder_start_token_id", None), getattr(m.config, "pad_token_id", None))
        if key not in self._by_tokens:
            if not hasattr(m, "prepare_decoder_input_ids_from_labels"):
                raise ValueError(f"{type(m).__name__} has no prepare_decoder_input_ids_from_labels: "
                                 "give the batch decoder_input_ids, or use a transformers "
                                 "encoder-decoder model")
            self._by_tokens[key] = m.prepare_decoder_input_ids_from_labels(labels=self.labels)
        return self._by_tokens[key]


def _count_items(batch) -> dict:
    """Items a batch contributes to each count kind: ``examples`` (every row, labelled or not:
    augmented rows carry labels -100) and ``labelled`` (rows with a label); for token-level
    labels, the label tokens that count, for both. Tensors stay tensors (no host sync)."""
    labels = batch.get("labels") if hasattr(batch, "get") else None
    if labels is not None and labels.dim() > 1:
        n = (labels != -100).sum()
        return {"examples": n, "labelled": n}
    if labels is not None:
        return {"examples": labels.shape[0], "labelled": (labels != -100).sum()}
    for k in ("input_ids", "inputs_embeds", COLUMN["logits"], ENSEMBLE_COLUMN):
        if k in batch:
            return {"examples": batch[k].shape[0], "labelled": 0}
    raise ValueError(f"cannot count the examples of a batch with keys {sorted(batch)}")


def _check_teacher_columns(dataset) -> None:
    """A ``teacher_*`` column the trainer does not read is a mistake (a misspelt cache column
    would otherwise make every step run the live teacher, or fail without one)."""
    for c in _columns(dataset) or []:
        if c.startswith("teacher_") and c not in TEACHER_COLUMNS:
            raise ValueError(f"train_dataset: column {c!r} is not a teacher column distilkit "
                             f"reads; known ones: {', '.join(TEACHER_COLUMNS)} (rename it, or "
                             "remove it)")


def _unserved(args, cached_columns) -> list[str]:
    """What the terms with a positive weight read from the teacher that ``cached_columns``
    (the batch's teacher-output columns) do not hold, one phrase per weight."""
    has = set(cached_columns)
    out = []
    for t in active_terms(args):
        if "token_states" in t.needs:
            out.append(f"{t.weight} reads per-token teacher states, never cached")
        elif t.name in TOPK_SERVES and TOPK_COLUMNS["ids"] in has:
            continue
        elif "logits" in t.needs and not has & {COLUMN["logits"], ENSEMBLE_COLUMN}:
            out.append(f"{t.weight} reads the teacher's logits (column {COLUMN['logits']})")
        elif "hidden_states" in t.needs and COLUMN["cls_hidden"] not in has:
            out.append(f"{t.weight} reads the teacher's [CLS] states (column {COLUMN['cls_hidden']})")
    return out


def _unserved_message(reasons: list, cached_columns) -> str:
    return (f"no teacher is loaded and the teacher-output cache does not hold what the loss "
            f"needs: {'; '.join(reasons)} (this data's teacher columns: "
            f"{', '.join(sorted(cached_columns)) or 'none'}); pass teacher_model=..., attach "
            "the teacher's outputs (distilkit.teacher_cache) or set those weights to 0")


def _check_served_without_teacher(args, dataset, teacher_config) -> None:
    """Without a teacher, every term that reads it must be served by cached columns of the
    training data (checked when its columns are known), and layer terms need the teacher's
    config to map layers."""
    cols = _columns(dataset)
    if cols is not None:
        cached = [c for c in cols if c in TEACHER_COLUMNS]
        reasons = _unserved(args, cached)
        if reasons:
            raise ValueError(_unserved_message(reasons, cached))
    layer_weights = [t.weight for t in active_terms(args) if t.uses_layers]
    if teacher_config is None and layer_weights:
        raise ValueError(f"no teacher is loaded: the layer losses ({', '.join(layer_weights)}) "
                         "need teacher_config=... (the teacher's config) to map layers")


def _use_eager_attention(model: nn.Module) -> None:
    m = unwrap(model)
    if getattr(m.config, "_attn_implementation", "eager") == "eager":
        return
    try:
        m.set_attn_implementation("eager")
    except Exception as e:  # a model without an eager path cannot give attention maps
        raise ValueError(f"alpha_attention > 0 needs attention maps, but {type(m).__name__} "
                         f"cannot switch to attn_implementation='eager' ({e}); set "
                         "alpha_attention: 0") from e
