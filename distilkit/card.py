"""Model cards for distilled students: a ``README.md`` the Hugging Face Hub understands.

:func:`model_card` writes YAML front-matter through ``huggingface_hub.ModelCardData`` (so
the keys and the ``model-index`` block are the Hub's own format): ``library_name``,
``pipeline_tag``, ``tags`` (distillation, distilkit, one or more per compression method),
``datasets`` and ``base_model`` when they are Hub ids, ``metrics``, and the evaluation results.
The body names the teacher, the data, the student and how it was initialised, each loss term
with its weight and paper, each compression method with its settings and citation (taken
from the method's ``citation`` attribute, so a new method documents itself), the figures table
from :mod:`distilkit.evaluate` and how to load the model.
"""
from __future__ import annotations

import json
import re
from typing import Any, Optional, Sequence

from distilkit.loss_terms import DISTILBERT, TANG, active_terms
from distilkit.teachers import BUILTIN_TEACHER

BUILTIN_DATA = "builtin:rotten_tomatoes"
BUILTIN_S2S_TEACHER = "builtin:truecase-bart"
BUILTIN_S2S_DATA = "builtin:truecase"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
PLACEHOLDER = "PATH_OR_REPO_ID"  # loading snippets before the repo is known (hub.py fills it)

# References the card cites by key (student, data, augmentation); each loss term carries its
# own (distilkit.loss_terms), and each compression method its ``citation``.
REFS = {
    "tang": TANG,
    "distilbert": DISTILBERT,
    "sft": "Shleifer, Rush. Pre-trained Summarization Distillation. 2020. arXiv:2010.13002",
    "seqkd": "Kim, Rush. Sequence-Level Knowledge Distillation. EMNLP 2016. arXiv:1606.07947",
    "vader": "Hutto, Gilbert. VADER: A Parsimonious Rule-based Model for Sentiment Analysis of "
             "Social Media Text. ICWSM 2014 (the Rotten Tomatoes sentence ratings)",
}

METHOD_TAGS = {
    "quantize": ["quantization", "quantized-distillation"], "ptq": ["quantization"],
    "prune_heads": ["pruning", "head-pruning"], "prune_ffn": ["pruning", "structured-pruning"],
    "prune_layers": ["pruning", "layer-pruning"], "magnitude": ["pruning", "sparsity"],
    "low_rank": ["low-rank", "factorization"], "lstm_projection": ["low-rank"],
}


def _is_hub_id(s: Any) -> bool:
    return isinstance(s, str) and bool(re.fullmatch(r"[\w.-]+/[\w.-]+", s)) and not s.startswith(".")


def _method_entries(recipe: dict, methods: Optional[Sequence]) -> list[dict]:
    """``[{"method": name, settings...}]`` from ``methods`` (names, config objects, records
    or dicts) or else from the recipe's ``compression`` list."""
    out = []
    for m in (methods if methods is not None else recipe.get("compression") or []):
        if isinstance(m, str):
            out.append({"method": m})
        elif isinstance(m, dict) and "config" in m:  # a compression record
            out.append({"method": m["method"], **m["config"]})
        elif isinstance(m, dict):
            out.append(dict(m))
        else:
            from distilkit.compress.base import config_to_dict

            out.append(config_to_dict(m))
    return out


def _citation(name: str) -> str:
    try:
        from distilkit.compress.base import get_method

        return get_method(name).citation or "(no citation recorded)"
    except (ValueError, TypeError, ImportError):
        return "(method not registered in this installation)"


def _describe_teacher(recipe: dict, finetune: Optional[dict] = None) -> tuple[str, Optional[str]]:
    """(prose, base_model hub id or None)."""
    spec = recipe.get("teacher")
    if isinstance(spec, dict) and spec.get("base"):
        base = spec["base"]
        where = f"[{base}](https://huggingface.co/{base})" if _is_hub_id(base) else f"`{base}`"
        info = finetune or {}
        val = info.get("validation") or {}
        figures = ", ".join(f"{k} {val[k]:.4f}" for k in ("accuracy", "macro_f1", "bleu")
                            if isinstance(val.get(k), (int, float)))
        steps = f"{info['steps']} steps" if info.get("steps") else "settings " + \
            json.dumps(spec.get("finetune") or {}, sort_keys=True)
        return (f"{where} fine-tuned on the training split by distilkit ({steps}"
                + (f"; validation {figures}" if figures else "") + ")",
                base if _is_hub_id(base) else None)
    if isinstance(spec, list):
        names = ", ".join(f"`{s}`" for s in spec)
        return f"an ensemble of {len(spec)} teachers ({names}), soft targets averaged", None
    if spec == BUILTIN_S2S_TEACHER:
        return ("distilkit's built-in truecasing teacher: a small BART trained from its config "
                "on the built-in sentences (input lower-cased without punctuation, target the "
                "original sentence)", None)
    if spec == BUILTIN_TEACHER:
        return (f"distilkit's built-in teacher: [{MINILM_HUB_ID}](https://huggingface.co/"
                f"{MINILM_HUB_ID}) (6 layers, hidden 384) fine-tuned on the built-in sentiment "
                "data", MINILM_HUB_ID)
    if _is_hub_id(spec):
        return f"[{spec}](https://huggingface.co/{spec})", spec
    return (f"a local model (`{spec}`)" if spec else "(not recorded)"), None


def _describe_data(recipe: dict) -> tuple[str, list[str]]:
    ds, files = recipe.get("dataset"), recipe.get("data_files")
    if files:
        if isinstance(files, dict):
            return "local files " + ", ".join(f"`{k}: {v}`" for k, v in files.items()), []
        listed = files if isinstance(files, list) else [files]
        return "local files " + ", ".join(f"`{f}`" for f in listed), []
    if ds == BUILTIN_S2S_DATA:
        return ("distilkit's built-in truecasing task: the Rotten Tomatoes sentences (Hutto & "
                "Gilbert 2014, from the vaderSentiment 3.3.2 sources) lower-cased with "
                "punctuation removed as the source, the original sentence as the target"), []
    if ds == BUILTIN_DATA:
        return ("distilkit's built-in data: the 10,605 Rotten Tomatoes sentences rated by humans "
                "(Hutto & Gilbert 2014, shipped in the vaderSentiment 3.3.2 sources), labelled by "
                "the sign of the mean rating, fixed train/validation/test split"), []
    if ds:
        cfg = recipe.get("dataset_config")
        return (f"[{ds}](https://huggingface.co/datasets/{ds})" + (f" (`{cfg}`)" if cfg else ""),
                [ds] if _is_hub_id(ds) or "/" not in ds else [])
    return "(not recorded)", []


def _describe_student(recipe: dict) -> tuple[str, list[str]]:
    s = dict(recipe.get("student") or {})
    kind = s.pop("type", "from_teacher")
    settings = json.dumps(s, sort_keys=True) if s else "defaults"
    if kind == "from_teacher":
        return (f"the teacher's architecture with fewer layers, initialised by copying teacher "
                f"layers (DistilBERT-style / shrink-and-fine-tune; settings: `{settings}`)",
                ["distilbert", "sft"])
    if kind == "bilstm":
        return (f"a BiLSTM classifier (word embeddings, one BiLSTM layer, max-pooling, MLP; "
                f"settings: `{settings}`)", ["tang"])
    if kind == "config":
        return f"a smaller configuration of the teacher's architecture (`{settings}`)", []
    return f"a pretrained model (`{settings}`)", []


def _front_matter(name: str, results: dict, base_model: Optional[str], datasets: list,
                  tags: list, split: Optional[str]) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    s = results.get("student") or {}
    seq2seq = results.get("task") == "seq2seq"
    task = "text2text-generation" if seq2seq else "text-classification"
    metrics = ((("bleu", "bleu", "BLEU"), ("chrf", "chrf", "chrF"),
                ("exact_match", "exact_match", "Exact match")) if seq2seq else
               (("accuracy", "accuracy", "Accuracy"), ("f1", "macro_f1", "Macro F1")))
    evals = []
    if datasets:
        for metric, key, label in metrics:
            if s.get(key) is not None:
                evals.append(EvalResult(task_type=task, dataset_type=datasets[0],
                                        dataset_name=datasets[0], dataset_split=split,
                                        metric_type=metric, metric_value=round(s[key], 4),
                                        metric_name=label))
    data = ModelCardData(library_name="transformers", pipeline_tag=task,
                         tags=tags, datasets=datasets or None, metrics=[m[0] for m in metrics],
                         base_model=base_model, model_name=name if evals else None,
                         eval_results=evals or None)
    return f"---\n{data.to_yaml()}\n---\n"


def model_card(results: dict, recipe: dict, methods: Optional[Sequence] = None,
               repo_id: Optional[str] = None) -> str:
    """The README.md of a distilled student.

    Args:
        results: a run's ``results.json`` content (``teacher`` / ``student`` figures from
            :func:`~distilkit.evaluate.evaluate_model`, ``name``, ``split``); may be partial.
        recipe: the resolved recipe (``Recipe.to_dict()``).
        methods: the compression methods applied (names, config objects, records or
            ``{method: ..., settings}`` dicts); default: the recipe's ``compression`` list.
        repo_id: used in the loading snippet (default: a placeholder).
    """
    recipe = recipe or {}
    name = results.get("name") or recipe.get("name") or "distilled-student"
    entries = _method_entries(recipe, methods)
    teacher_txt, base_model = _describe_teacher(recipe, results.get("teacher_finetune"))
    data_txt, datasets = _describe_data(recipe)
    student_txt, student_refs = _describe_student(recipe)
    seq2seq = results.get("task") == "seq2seq"
    tags = ["distillation", "knowledge-distillation", "distilkit",
            "text2text-generation" if seq2seq else "text-classification"]
    if seq2seq and recipe.get("sequence_kd"):
        tags.append("sequence-level-distillation")
    for e in entries:
        for t in METHOD_TAGS.get(e["method"], [e["method"].replace("_", "-")]):
            if t not in tags:
                tags.append(t)
    split = results.get("split")
    refs: list[str] = []

    def cite_texts(texts):
        for r in texts:
            if r not in refs:
                refs.append(r)
        return ", ".join(f"[{refs.index(r) + 1}]" for r in texts)

    def cite(keys):
        return cite_texts([REFS[k] for k in keys])

    lines = [_front_matter(name, results, base_model, datasets, tags, split), f"# {name}", "",
             f"A {'sequence-to-sequence model' if seq2seq else 'text classifier'} distilled "
             f"with distilkit from {teacher_txt}.", "", "## Teacher, student and data", "",
             f"- **Teacher**: {teacher_txt}."]
    t, s = results.get("teacher") or {}, results.get("student") or {}
    if t.get("parameters"):
        lines[-1] += f" {t['parameters']:,} parameters."
    lines.append(f"- **Student**: {student_txt}" + (f" {cite(student_refs)}." if student_refs else "."))
    lines.append(f"- **Data**: {data_txt}" + (f" {cite(['vader'])}." if recipe.get("dataset") == BUILTIN_DATA else "."))
    if recipe.get("augment"):
        lines.append(f"- **Transfer-set augmentation** (`{json.dumps(recipe['augment'], sort_keys=True)}`): "
                     f"masking / POS-guided replacement / n-gram sampling, labelled by the teacher {cite(['tang'])}.")
    if recipe.get("sequence_kd"):
        lines.append(f"- **Sequence-level distillation** (`{json.dumps(recipe['sequence_kd'], sort_keys=True)}`): "
                     f"the student trains on the teacher's generations for the training inputs "
                     f"{cite(['seqkd'])}.")
    if recipe.get("max_length"):
        lines.append(f"- **Max sequence length**: {recipe['max_length']} tokens.")

    lines += ["", "## Distillation loss", "", "| Term | Weight | Matches | Reference |",
              "|---|---:|---|---|"]
    # The recipe's weights (Recipe.to_dict() carries those left at their defaults too).
    terms = active_terms(recipe)
    for term in terms:
        texts = term.references(recipe)
        lines.append(f"| {term.title} | {recipe[term.weight]} | {term.matches} | "
                     f"{cite_texts(texts) if texts else '-'} |")
    extra = []
    if recipe.get("alpha_kd") and recipe.get("temperature") is not None:
        extra.append(f"temperature T = {recipe['temperature']}")
    if any(t.uses_layers for t in terms):
        extra.append(f"layer map `{recipe.get('layer_map')}`")
        if recipe.get("decoder_layer_map") is not None:
            extra.append(f"decoder layer map `{recipe['decoder_layer_map']}`")
    for k in ("max_steps", "num_train_epochs", "learning_rate", "per_device_train_batch_size", "seed"):
        if recipe.get(k) is not None and not (k == "max_steps" and recipe[k] in (-1, None)):
            extra.append(f"{k} = {recipe[k]}")
    if extra:
        lines += ["", "Training: " + ", ".join(extra) + "."]

    lines += ["", "## Compression", ""]
    if entries:
        for i, e in enumerate(entries, 1):
            settings = ", ".join(f"{k}={v}" for k, v in e.items() if k != "method" and v is not None)
            refs.append(_citation(e["method"]))
            lines.append(f"{i}. **{e['method']}** ({settings or 'defaults'}) [{len(refs)}]")
    else:
        lines.append("None: the student is stored in full precision.")

    if s and seq2seq:
        lines += ["", "## Results", ""]
        if split:
            lines += [f"On the `{split}` split ({s.get('n', '?')} sentences), generated with "
                      f"`{json.dumps(recipe.get('generation') or {}, sort_keys=True)}`; latency "
                      "is the median CPU time to generate one sentence (batch 1).", ""]
        lines.append(_seq2seq_table(name, t, s))
    elif s:
        from distilkit.report import build_rows, markdown_table

        rows = build_rows([{"name": name, "teacher": t or s, "student": s, "recipe": recipe}])
        lines += ["", "## Results", ""]
        if split:
            lines.append(f"On the `{split}` split ({s.get('examples', '?')} examples); CPU latency "
                         f"with {s.get('threads', '?')} threads at sequence length "
                         f"{s.get('max_length', '?')}, median after warm-up.")
            lines.append("")
        lines.append(markdown_table(rows if t else rows[1:]))
    lines += _runtimes_section(name, results)
    where = repo_id or PLACEHOLDER
    lines += ["", "## How to load", "", "```python", "import distilkit",
              "from transformers import AutoTokenizer", "",
              f"model = distilkit.from_pretrained(\"{where}\")",
              f"tokenizer = AutoTokenizer.from_pretrained(\"{where}\")",
              "```", ""]
    plain = not entries and (recipe.get("student") or {}).get("type") != "bilstm"
    auto = "AutoModelForSeq2SeqLM" if seq2seq else "AutoModelForSequenceClassification"
    if plain:
        lines += ["The student is a plain transformers model, so this works too:", "",
                  "```python", f"from transformers import {auto}", "",
                  f"model = {auto}.from_pretrained(\"{where}\")", "```", ""]
    else:
        lines += ["`distilkit.from_pretrained` rebuilds the compressed layers described in "
                  "`compression_config.json` (or registers the BiLSTM architecture) before "
                  f"loading the weights; plain `{auto}` cannot.", ""]
    lines += ["## References", ""] + [f"{i}. {r}" for i, r in enumerate(refs, 1)]
    return "\n".join(lines) + "\n"


def _runtimes_section(name: str, results: dict) -> list[str]:
    """"Runtimes": the student in every runtime of its export against the teacher in PyTorch
    fp32 (when the run measured them), and the ``Serve:`` line naming the export's file to
    serve with how to run it; nothing when the run did not export."""
    export = results.get("export") or {}
    if not export.get("serve"):
        return []
    seq2seq = results.get("task") == "seq2seq"
    lines = ["", "## Runtimes", ""]
    if results.get("runtimes") and results.get("teacher"):
        from distilkit.report import runtime_rows, runtimes_table

        how = (f"greedy generation of at most {(export.get('generation') or {}).get('max_new_tokens', '?')}"
               " new tokens; agreement = share of sentences whose output equals the PyTorch "
               "student's" if seq2seq else
               f"sequence length {export.get('max_length', '?')}; agreement = share of rows on "
               "which the runtime predicts what the student in PyTorch predicts")
        lines += [f"The student exported to ONNX (`{export.get('dir', 'onnx')}`), measured in "
                  f"every runtime on the `{export.get('split', '?')}` split "
                  f"({export.get('examples', '?')} examples) with {export.get('threads', '?')} "
                  f"threads, {how}. The teacher in PyTorch fp32 is 1.00x.", "",
                  runtimes_table(runtime_rows([{**results, "name": name}])), ""]
    else:
        files = ", ".join(f"`{f}`" for f in (export.get("files") or {}).values())
        lines += [f"Exported to ONNX: {files or '(files not recorded)'}.", ""]
    serve = export["serve"]
    lines += [f"Serve: `{serve}`", ""]
    if export.get("serve_rule"):
        lines += [f"(Why this file: {export['serve_rule']}.)", ""]
    if seq2seq:
        where = serve.rsplit("/", 1)[0] if "/" in serve else "."
        return lines + [
            "```python", "from distilkit.export.seq2seq import OnnxSeq2SeqGenerator", "",
            f"gen = OnnxSeq2SeqGenerator(\"{where}\", variant=\"{export.get('serve_variant', 'fp32')}\")",
            "enc = gen.tokenizer([\"a charming film\"], return_tensors=\"np\")",
            "print(gen.decode(gen.generate(enc[\"input_ids\"], enc[\"attention_mask\"])))",
            "```"]
    disabled = export.get("disabled_optimizers")
    opened = (f"session = ort.InferenceSession(\"{serve}\", "
              f"disabled_optimizers={json.dumps(list(disabled))})" if disabled else
              f"session = ort.InferenceSession(\"{serve}\")")
    lines += ["```python", "import onnxruntime as ort", "from transformers import AutoTokenizer",
              "", f"tokenizer = AutoTokenizer.from_pretrained(\"{serve.rsplit('/', 1)[0]}\")"
              if "/" in serve else "tokenizer = AutoTokenizer.from_pretrained(\".\")",
              *(["# (onnxruntime's SkipLayerNormalization fusion is slower on CPU: leave it "
                 "off)"] if disabled else []),
              opened,
              "enc = tokenizer([\"a charming film\"], return_tensors=\"np\")",
              "logits = session.run(None, {i.name: enc[i.name] for i in session.get_inputs()})[0]",
              "```"]
    return lines


def _seq2seq_table(name: str, t: dict, s: dict) -> str:
    """Teacher and student generation figures (BLEU, chrF, exact match, size, latency)."""
    head = ["Model", "BLEU", "chrF", "Exact match", "BLEU retention", "Parameters",
            "Size (MB)", "Compression", "Latency b1 (ms)", "Speed-up b1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "n/a"

    rows = ([("**teacher**", t)] if t else []) + [(name, s)]
    for label, m in rows:
        ret = f"{100 * m['bleu'] / t['bleu']:.1f}%" if t.get("bleu") else "n/a"
        size = m.get("size_on_disk_bytes")
        lines.append("| " + " | ".join([
            label, f"{m['bleu']:.2f}", f"{m.get('chrf', float('nan')):.2f}",
            f"{m.get('exact_match', float('nan')):.3f}", ret, f"{m.get('parameters', 0):,}",
            f"{size / 1e6:.2f}" if size else "n/a",
            ratio(t.get("size_on_disk_bytes"), size), f"{m['latency_ms']:.1f}" if m.get("latency_ms") else "n/a",
            ratio(t.get("latency_ms"), m.get("latency_ms"))]) + " |")
    return "\n".join(lines)
