"""``distilkit export RUN_OR_MODEL_DIR --format onnx [--int8]``: a student as ONNX for
onnxruntime, checked against PyTorch before it is handed over.

One module per model kind (:mod:`~distilkit.export.classifier`), what they share in
:mod:`~distilkit.export.runtime`; :func:`export_onnx` picks the kind from the saved config.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from distilkit.export.classifier import CHECK_TEXTS, TOLERANCE, check_batches, compare
from distilkit.export.runtime import FP32_FILE, INT8_FILE, REPORT_FILE

__all__ = ["export_onnx", "format_export", "quantized_ops", "CHECK_TEXTS", "TOLERANCE",
           "check_batches", "compare", "FP32_FILE", "INT8_FILE", "REPORT_FILE"]


def export_onnx(model_dir: str, out_dir: Optional[str] = None, int8: bool = False,
                four_bit: bool = False, check_data: Optional[Sequence[str]] = None,
                tolerance: float = TOLERANCE) -> dict:
    """Export the student in ``model_dir`` (a model directory, or a run directory with
    ``student/``) to ``out_dir`` (default ``MODEL_DIR/onnx``): ``model.onnx``, with ``int8``
    also ``model_int8.onnx`` (onnxruntime dynamic int8), with ``four_bit`` also
    ``model_4bit.onnx`` (a 4-bit quantized student's packed codes in ``MatMulNBits``), and
    ``export.json`` with the check's figures. Encoder-decoder models go to
    :func:`distilkit.export.seq2seq.export_seq2seq`, the rest to
    :func:`distilkit.export.classifier.export_classifier`."""
    from distilkit.evaluate import find_model_dir

    model_dir = find_model_dir(model_dir)
    if _is_encoder_decoder(model_dir):
        from distilkit.export.seq2seq import export_seq2seq

        return export_seq2seq(model_dir, out_dir, int8=int8, four_bit=four_bit,
                              check_data=check_data, tolerance=tolerance)
    from distilkit.export.classifier import export_classifier

    return export_classifier(model_dir, out_dir, int8=int8, four_bit=four_bit,
                             check_data=check_data, tolerance=tolerance)


def _is_encoder_decoder(model_dir: str) -> bool:
    import json

    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        return bool(json.load(f).get("is_encoder_decoder", False))


def quantized_ops(entry: dict) -> Optional[dict]:
    """The 4-bit operator figures of one ``export.json`` file entry: ``matmulnbits_nodes``
    (packed linears), ``gatherblockquantized_nodes`` (packed embeddings), ``bucket_sizes`` and
    ``accuracy_level``, summed over a seq2seq export's three graphs (its ``nbits`` holds them
    per graph); None for an entry without 4-bit operators (fp32, int8)."""
    if "matmulnbits_nodes" in entry:
        per_graph = [entry]
    elif entry.get("nbits"):
        per_graph = list(entry["nbits"].values())
    else:
        return None
    return {"matmulnbits_nodes": sum(g["matmulnbits_nodes"] for g in per_graph),
            "gatherblockquantized_nodes": sum(g.get("gatherblockquantized_nodes", 0)
                                              for g in per_graph),
            "bucket_sizes": sorted({b for g in per_graph for b in g.get("bucket_sizes", [])}),
            "accuracy_level": per_graph[0].get("accuracy_level")}


def format_export(res: dict) -> str:
    """The figures, one line per file (the 4-bit file's MatMulNBits and GatherBlockQuantized
    counts, bucket sizes and accuracy level on its line: a count of 0 GatherBlockQuantized says
    the embeddings stayed fp32), and the file to serve, for the terminal."""
    lines = [f"exported {res['model_dir']} -> {res['out_dir']} (inputs: {', '.join(res['inputs'])};"
             f" checked on {res['check_rows']} rows, tolerance {res['tolerance']:g})"]
    for kind, f in res["files"].items():
        line = (f"{kind:<5} {f['file']:<16} {f['bytes'] / 1e6:8.2f} MB  max |logit diff| "
                f"{f['max_abs_diff']:.2e}  argmax agreement {f['argmax_agreement']:.3f}")
        ops = quantized_ops(f)
        if ops:
            line += (f"  ({ops['matmulnbits_nodes']} MatMulNBits, "
                     f"{ops['gatherblockquantized_nodes']} GatherBlockQuantized, bucket "
                     f"{'/'.join(map(str, ops['bucket_sizes'])) or 'n/a'}, accuracy_level "
                     f"{ops['accuracy_level']})")
        lines.append(line)
    lines.append(f"serve: {res['serve']}")
    return "\n".join(lines)


def add_export_arguments(p) -> None:
    """Arguments of ``distilkit export`` (wired by :mod:`distilkit.cli`)."""
    p.add_argument("model_dir", help="a saved model directory, or a run directory with student/")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format")
    p.add_argument("--int8", action="store_true",
                   help="also write model_int8.onnx (onnxruntime dynamic int8 quantization)")
    p.add_argument("--4bit", dest="four_bit", action="store_true",
                   help="also write model_4bit.onnx: a 4-bit quantized student's packed codes and "
                        "bucket scales in onnxruntime's MatMulNBits (bucket sizes: powers of two "
                        ">= 16 dividing each layer's in_features); served when written")
    p.add_argument("--out", help="output directory (default MODEL_DIR/onnx)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help=f"max |logit diff| allowed for the fp32 and 4-bit exports (default "
                        f"{TOLERANCE:g})")
    p.add_argument("--texts", metavar="FILE",
                   help="check the export on these sentences, one a line, or sentence pairs as "
                        "'first<TAB>second' lines (a sentence-pair student needs pairs); "
                        "default: a few built-in ones")


def read_texts(path: str) -> list:
    """The non-blank lines of text file ``path``, the sentences to check an export on: a
    line with a tab is a sentence pair ``(first, second)`` split at its first tab. All lines
    must be of one kind (sentences or pairs)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--texts: {path!r} is not a file; give a text file with one "
                                "sentence a line (or 'first<TAB>second' pairs)")
    rows: list = []  # (line number, sentence or pair)
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if "\t" in line:
                first, second = (x.strip() for x in line.split("\t", 1))
                if not first or not second:
                    raise ValueError(f"--texts: {path!r} line {number} is a pair with an empty "
                                     "side; write 'first<TAB>second' with both sentences")
                rows.append((number, (first, second)))
            else:
                rows.append((number, line.strip()))
    if not rows:
        raise ValueError(f"--texts: {path!r} holds no sentence; give one sentence a line")
    pairs = isinstance(rows[0][1], tuple)
    odd = next((n for n, t in rows if isinstance(t, tuple) != pairs), None)
    if odd is not None:
        raise ValueError(f"--texts: {path!r} mixes sentence pairs ('first<TAB>second') and "
                         f"single sentences (line {odd} is not like line {rows[0][0]}); use one "
                         "kind in the whole file")
    texts = [t for _, t in rows]
    return texts


def run_export(args, rest=None) -> int:
    texts = read_texts(args.texts) if args.texts else None
    print(format_export(export_onnx(args.model_dir, args.out, int8=args.int8,
                                    four_bit=args.four_bit, check_data=texts,
                                    tolerance=args.tolerance)))
    return 0
