"""``task: seq2seq``: encoder-decoder distillation (T5, BART, Marian).

The recipe's ``text_column`` is the source and ``label_column`` the target; the built-in task
is ``dataset: builtin:truecase`` (``text_column: source``, ``label_column: target``) with the
teacher ``builtin:truecase-bart``. Students are built as for classification (``from_teacher``
with ``num_layers`` / ``num_decoder_layers`` / ``keep_decoder_layers``, ``config`` or
``pretrained``). ``sequence_kd:`` trains on the teacher's (cached) generations for the
training inputs (Kim & Rush 2016); with ``label_column: null`` the student can only learn
from them, so ``sequence_kd`` is then required. Token-level KD on decoder logits, label CE
and the layer losses with ``layer_map`` / ``decoder_layer_map`` are the trainer's.
``teacher_cache: {top_k: N}`` computes the token-level KD targets once, on the targets the
student trains on: the teacher's N most likely tokens per target token at the run's
temperature (:mod:`distilkit.seq2seq.topk_cache`); the trainer then reads them instead of
running the teacher. Teacher and student are evaluated by generation (BLEU, chrF, exact match,
parameters, size, latency).

The teacher (without an adapter) is loaded lazily: its tokenizer and config up front, its
weights only when a cache misses (generations, top-k distributions, and with the top-k cache
its evaluation figures, cached in that cache's namespace) or a term runs it live; the student
is built from its directory. A rerun with everything cached never reads its weights.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from distilkit.tasks.base import (Prepared, Task, Teachers, build_student,
                                  check_max_length, ratios)

BUILTIN_S2S_TEACHER = "builtin:truecase-bart"
FIGURES_VERSION = 2   # 2: latency_tokens (what a stand-in writes)


def _builtin_settings(recipe):
    """The built-in teacher's data settings (sentence length limit, training windows), or
    None for any other teacher."""
    from distilkit.seq2seq.teacher import builtin_truecase_settings

    return (builtin_truecase_settings()
            if recipe is None or recipe.keys.teacher == BUILTIN_S2S_TEACHER else None)


def seq2seq_teacher_dir(spec, progress: bool = True, raw=None, data=None) -> str:
    """The directory of a teacher path, the built-in one (trained here or cached), or a
    ``{base, finetune}`` teacher fine-tuned on ``raw`` (columns named by ``data``)."""
    from distilkit.finetune import resolve_teacher
    from distilkit.seq2seq.teacher import builtin_truecase_settings, truecase_teacher

    if spec == BUILTIN_S2S_TEACHER:
        path = truecase_teacher(builtin_truecase_settings(), progress=progress)
    elif isinstance(spec, dict):
        path = resolve_teacher(spec, raw=raw, data=data, task="seq2seq", progress=progress)
    elif isinstance(spec, list):
        raise ValueError(f"teacher: {spec!r}; a seq2seq recipe takes one teacher (a directory "
                         f"or '{BUILTIN_S2S_TEACHER}')")
    else:
        path = resolve_teacher(spec)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"teacher: {spec!r} is not a local directory; a seq2seq "
                                    "recipe needs one saved with save_pretrained (model and "
                                    f"tokenizer) or '{BUILTIN_S2S_TEACHER}'")
    return path


def resolve_seq2seq_teacher(spec, adapter: Optional[str] = None, progress: bool = True,
                            raw=None, data=None):
    """``(teacher model, tokenizer, directory)`` for a teacher spec (see
    :func:`seq2seq_teacher_dir`)."""
    from distilkit.seq2seq.teacher import load_seq2seq_teacher

    path = seq2seq_teacher_dir(spec, progress, raw, data)
    model, tok = load_seq2seq_teacher(path, adapter=adapter)
    if not getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"teacher: {path!r} is a {type(model).__name__}, not an "
                         "encoder-decoder model; use task: classification for it")
    return model, tok, path


LATENCY_SAMPLES = 16   # sources a model's latency (batch 1) is the median over


def evaluate_seq2seq_model(model, tokenizer, dataset, model_dir: Optional[str] = None,
                           source_column: str = "source", target_column: str = "target",
                           generation: Optional[dict] = None, max_samples: Optional[int] = None,
                           latency_samples: int = LATENCY_SAMPLES) -> dict:
    """Generation scores, parameters, size of the saved files and latency of one model."""
    from distilkit.evaluate import count_parameters, model_files
    from distilkit.seq2seq.generate_eval import GenerationSettings, evaluate_generation

    gen = GenerationSettings(**(generation or {}))
    out = evaluate_generation(model, tokenizer, dataset, source_column, target_column, gen,
                              max_samples, latency_samples)
    params, nonzero = count_parameters(model)
    out.update(parameters=params, nonzero_parameters=nonzero)
    if model_dir:
        out["size_on_disk_bytes"] = sum(model_files(model_dir).values())
    return out


class Seq2SeqTask(Task):
    name = "seq2seq"

    def validate(self, recipe) -> None:
        if not recipe.data.label_column and not recipe.keys.sequence_kd:
            raise ValueError("label_column: null (no targets) needs sequence_kd: {...}, so the "
                             "student trains on the teacher's generations")
        from distilkit.seq2seq.generate_eval import GenerationSettings
        from distilkit.seq2seq.sequence_kd import sequence_kd_settings

        GenerationSettings(**(recipe.keys.generation or {}))
        if recipe.keys.sequence_kd:
            sequence_kd_settings(recipe.keys.sequence_kd)
        if recipe.keys.teacher_cache and recipe.distil_config().alpha_kd <= 0:
            raise ValueError(f"teacher_cache: {recipe.keys.teacher_cache} caches the targets of "
                             "token-level KD, but alpha_kd is 0; set alpha_kd > 0 or remove "
                             "teacher_cache")

    def load_data(self, recipe):
        from distilkit.seq2seq.data import load_seq2seq_data

        b = _builtin_settings(recipe)
        return load_seq2seq_data(recipe.data, b.max_words if b else None,
                                 b.train_windows if b else False)

    def load_teachers(self, recipe, raw, progress: bool) -> Teachers:
        k = recipe.keys
        if k.teacher_adapter:  # the merged model is the teacher: built up front
            model, tok, path = resolve_seq2seq_teacher(k.teacher, k.teacher_adapter, progress,
                                                       raw=raw, data=recipe.data)
            check_max_length(k.max_length, model.config)
            return Teachers(specs=[path], tokenizer=tok, config=model.config,
                            loader=lambda s: model, adapter=k.teacher_adapter, _models=[model])
        # Its tokenizer and config now, its weights only when something misses a cache (the
        # generations, the top-k distributions, its evaluation figures) or a term runs it.
        from transformers import AutoConfig, AutoTokenizer

        from distilkit.modeling import ensure_registered
        from distilkit.seq2seq.teacher import load_seq2seq_teacher

        path = seq2seq_teacher_dir(k.teacher, progress, raw=raw, data=recipe.data)
        ensure_registered()
        config = AutoConfig.from_pretrained(path)
        if not getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"teacher: {path!r} holds a {type(config).__name__}, not an "
                             "encoder-decoder model; use task: classification for it")
        check_max_length(k.max_length, config)
        return Teachers(specs=[path], tokenizer=AutoTokenizer.from_pretrained(path),
                        config=config, loader=lambda s: load_seq2seq_teacher(s)[0])

    def build_student(self, recipe, raw, teachers: Teachers):
        kind = recipe.keys.student.get("type", "from_teacher")
        # From the teacher's layers the student reads the teacher's directory (only the kept
        # tensors); a fresh config needs only its config: neither builds the teacher.
        if kind == "from_teacher" and teachers.first_dir and not teachers.loaded:
            teacher = teachers.first_dir
        elif kind == "config":
            teacher = teachers.config
        else:
            teacher = teachers.models()[0]
        student, tok = build_student(recipe, teacher, teachers.tokenizer)
        if not getattr(student.config, "is_encoder_decoder", False):
            raise ValueError(f"student: {type(student).__name__} is not an encoder-decoder model")
        return student, tok

    def prepare(self, recipe, args, raw, teachers: Teachers, student, tokenizer,
                progress: bool) -> Prepared:
        from distilkit.seq2seq.data import seq2seq_collator, tokenize_seq2seq
        from distilkit.seq2seq.generate_eval import GenerationEvalCallback, GenerationSettings
        from distilkit.seq2seq.sequence_kd import sequence_kd_dataset, sequence_kd_settings

        k, spec = recipe.keys, recipe.data
        src, tgt, n = spec.text_column, spec.label_column, k.max_length
        evals = {s: raw[s] for s in (spec.eval_split, spec.test_split) if s}
        data = tokenize_seq2seq(evals, tokenizer, src, tgt, n, n) if evals else {}
        stats: dict = {}
        if k.sequence_kd:
            cache = os.path.join(k.cache_dir, "generations") if k.cache_dir else None
            stats["sequence_kd"] = {}
            # Keyed by the saved files when there are some (loaded only on a miss); a teacher
            # with an adapter is the merged model, keyed by its weights.
            by_path = teachers.first_dir is not None and not teachers.adapter
            teacher = teachers.first_dir if by_path else teachers.models()[0]
            train_ds = sequence_kd_dataset(teacher, tokenizer, raw[spec.train_split],
                                           sequence_kd_settings(k.sequence_kd), src, tgt,
                                           cache_dir=cache, max_source_length=n,
                                           max_target_length=n, stats=stats["sequence_kd"],
                                           progress=progress,
                                           teacher_loader=lambda _: teachers.models()[0])
        else:
            train_ds = tokenize_seq2seq(raw[spec.train_split], tokenizer, src, tgt, n, n)
        cached = False
        if k.teacher_cache:
            train_ds, cached = self._attach_topk(recipe, args, teachers, train_ds, stats, progress)
        callbacks = []
        if spec.eval_split and args.eval_strategy != "no":
            callbacks.append(GenerationEvalCallback(
                tokenizer, raw[spec.eval_split], src, tgt, GenerationSettings(**(k.generation or {})),
                spec.max_eval_samples or 200))
        return Prepared(train_dataset=train_ds, eval_dataset=data.get(spec.eval_split),
                        collator=seq2seq_collator(tokenizer), importance_dataset=train_ds,
                        callbacks=callbacks, teacher_cached=cached,
                        stats={"sequence_kd": stats.get("sequence_kd") or None,
                               "topk_cache": stats.get("topk_cache")})

    @staticmethod
    def _attach_topk(recipe, args, teachers: Teachers, train_ds, stats: dict, progress: bool):
        """The training set with the teacher's cached top-k distribution of every target token
        (the targets it trains on: the teacher's generations under sequence_kd), and whether
        that cache serves every teacher-based term (then the trainer needs no teacher)."""
        from distilkit.loss_terms import topk_unserved
        from distilkit.seq2seq.topk_cache import attach_topk

        k = recipe.keys
        unserved = topk_unserved(args)
        if unserved:
            print(f"[distilkit] teacher_cache: not used, because {', '.join(unserved)} read(s) "
                  "more of the teacher than its top-k token distribution; the teacher runs "
                  "every step", file=sys.stderr)
            return train_ds, False
        # By path the key is the saved files (the teacher already loaded serves a miss); a
        # teacher with an adapter is the merged model, keyed by its weights.
        by_path = teachers.first_dir is not None and not teachers.adapter
        info: dict = {}
        train_ds = attach_topk(
            train_ds, teachers.first_dir if by_path else teachers.models()[0],
            top_k=k.teacher_cache["top_k"], temperature=args.temperature,
            tokenizer_name_or_path=teachers.first_dir if by_path else teachers.tokenizer,
            max_length=k.max_length,
            cache_dir=os.path.join(k.cache_dir, "topk") if k.cache_dir else None,
            teacher_loader=lambda _: teachers.models()[0], teacher_dtype=args.teacher_dtype,
            stats=info, progress=progress)
        stats["topk_cache"] = info
        teachers.cache_namespace = info["namespace"]
        return train_ds, True

    def eval_settings(self, recipe) -> tuple[str, dict]:
        k, spec = recipe.keys, recipe.data
        return spec.test_split or spec.eval_split, dict(
            source_column=spec.text_column, target_column=spec.label_column,
            generation=k.generation, max_samples=spec.max_eval_samples)

    def measure(self, model, tokenizer, dataset, model_dir, settings: dict) -> dict:
        return evaluate_seq2seq_model(model, tokenizer, dataset, model_dir, **settings)

    def figures_key(self, recipe, dataset, settings: dict) -> str:
        """The split's contents, the generation settings, the sample limit and the threads."""
        import hashlib
        import json

        import torch

        h = hashlib.sha256(f"v{FIGURES_VERSION}:threads={torch.get_num_threads()}".encode())
        h.update(json.dumps(dict(settings), sort_keys=True, default=str).encode())
        for c in (settings["source_column"], settings["target_column"]):
            h.update(json.dumps(list(dataset[c]), default=str).encode())
        return h.hexdigest()

    def evaluate(self, recipe, raw, teachers: Teachers, student_dir: str,
                 progress: bool, teacher_figures: Optional[dict] = None) -> tuple[dict, dict, str]:
        from distilkit.compress.base import load_compressed

        from distilkit.device import processes

        split, settings = self.eval_settings(recipe)
        t_m = teacher_figures or self.evaluate_teacher(recipe, raw, teachers)
        student = load_compressed(student_dir)
        s_m = self.measure(student, teachers.tokenizer, raw[split], student_dir, settings)
        timed, lengths = None, None
        if "latency_ms" in t_m and "latency_ms" in s_m:
            # The speed-up is read from the two timed in turns, now: the teacher's figures
            # may be cached from another hour. The loaded teacher in a single process; else
            # (fully cached, or sharded: its generation is a collective the main process
            # cannot run alone) a stand-in of its architecture with random weights, made to
            # write the tokens the teacher wrote for each source.
            if teachers.loaded and processes() == 1:
                timed = teachers.models()[0]
            elif t_m.get("latency_tokens"):
                from transformers import AutoModelForSeq2SeqLM

                timed = teachers.stand_in(AutoModelForSeq2SeqLM)
                lengths = {"teacher": t_m["latency_tokens"]}
        if timed is not None:
            from distilkit.seq2seq.generate_eval import (GenerationSettings,
                                                         side_by_side_latency_ms)

            n = len(lengths["teacher"]) if lengths else \
                min(LATENCY_SAMPLES, settings["max_samples"] or LATENCY_SAMPLES)
            lat = side_by_side_latency_ms(
                {"teacher": timed, "student": student}, teachers.tokenizer,
                raw[split][settings["source_column"]][:n],
                GenerationSettings(**(settings["generation"] or {})), lengths=lengths)
            method = "timed in turns with the student (generate_eval.side_by_side_latency_ms)"
            if lengths:
                method += "; the teacher's architecture with random weights, writing its tokens"
            t_m = {**t_m, "latency_ms": round(lat["teacher"], 3), "latency_method": method}
            s_m = {**s_m, "latency_ms": round(lat["student"], 3),
                   "latency_method": "timed in turns with the teacher "
                                     "(generate_eval.side_by_side_latency_ms)"}
        return t_m, s_m, split

    def compare(self, teacher: dict, student: dict) -> dict:
        return {"bleu_retention": student["bleu"] / max(teacher["bleu"], 1e-9),
                **ratios(teacher, student),
                "speedup_batch1": teacher["latency_ms"] / max(student["latency_ms"], 1e-9)}

    def summary(self, results: dict) -> str:
        t, s = results["teacher"], results["student"]
        row = ("{:8} BLEU {bleu:6.2f}  chrF {chrf:6.2f}  exact {exact_match:.3f}  params "
               "{parameters:,}  size {mb:.2f} MB  latency {latency_ms:.1f} ms")
        return "\n".join([
            f"== distilkit: {results['name']} (seq2seq, split: {results['split']}) ==",
            row.format("teacher", mb=t["size_on_disk_bytes"] / 1e6, **t),
            row.format("student", mb=s["size_on_disk_bytes"] / 1e6, **s),
            f"BLEU retention {100 * results['bleu_retention']:.1f}%   size "
            f"{results['size_ratio']:.2f}x smaller   parameters {results['parameter_ratio']:.2f}x "
            f"fewer   speed-up (batch 1) {results['speedup_batch1']:.2f}x   "
            f"time {results['train_seconds']:.0f}s", *_topk_line(results.get("topk_cache"))])

    def default_spec(self):
        from distilkit.seq2seq.data import default_seq2seq_spec

        return default_seq2seq_spec()

    def evaluate_dir(self, model_dir: str, recipe, spec, split: Optional[str],
                     max_length: Optional[int], latency: bool) -> dict:
        """Generate over ``split`` of ``spec`` (default: the recipe's data, else the built-in
        truecasing task) with the recipe's generation settings and score it."""
        from transformers import AutoTokenizer

        from distilkit.compress.base import load_compressed
        from distilkit.seq2seq.data import load_seq2seq_data

        spec = spec or (recipe.data if recipe else self.default_spec())
        b = _builtin_settings(recipe)
        split = split or spec.test_split or spec.eval_split
        raw = load_seq2seq_data(spec, b.max_words if b else None)
        if split not in raw:
            raise ValueError(f"split {split!r} is not in the dataset; it has {sorted(raw)}")
        res = evaluate_seq2seq_model(load_compressed(model_dir),
                                     AutoTokenizer.from_pretrained(model_dir), raw[split],
                                     model_dir, spec.text_column, spec.label_column,
                                     recipe.keys.generation if recipe else None,
                                     latency_samples=LATENCY_SAMPLES if latency else 0)
        res.update(split=split, task="seq2seq")
        return res


def _topk_line(info: Optional[dict]) -> list:
    """The summary's line on the top-k teacher cache (none without one)."""
    if not info:
        return []
    return [f"top-k teacher cache: k={info['top_k']} at T={info['temperature']:g}, "
            f"{info['bytes_per_token']} bytes per cached token, {info['tokens']:,} target tokens "
            f"({info['hits']}/{info['examples']} examples were cached, {info['computed']} computed)"]


