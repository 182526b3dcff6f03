"""One copy on disk of the weights that several ONNX graphs of one model hold.

A seq2seq export is three graphs (encoder, first decoder step, decoder step with past), and
the two decoder graphs carry the same decoder weights, the word embedding appearing in all
three: written as they are traced, the files hold the decoder about twice (8.0 MB of graphs
for a 3.0 MB student). ONNX lets a graph keep a tensor outside the ``.onnx`` file, as a
byte range of another file named relative to the graph (external data: ``location``,
``offset``, ``length``), and onnxruntime reads it from there. :func:`share_initializers`
moves every large initializer of the given graphs into one weights file, each distinct
tensor (same type, shape and bytes) stored once, and points each graph at its copy; the
graphs compute what they computed, byte for byte the same weights.

Small initializers (shapes, scalars: under ``min_bytes``) stay inside their graphs, where
onnxruntime's optimizer folds them. Offsets are aligned to ``ALIGN`` bytes.
"""
from __future__ import annotations

import hashlib
import os
from typing import Sequence

ALIGN = 64
MIN_BYTES = 1024


def share_initializers(out_dir: str, graph_files: Sequence[str], weights_file: str,
                       min_bytes: int = MIN_BYTES) -> dict:
    """Rewrite ``graph_files`` (names in ``out_dir``) so that their initializers of at least
    ``min_bytes`` live once each in ``out_dir/weights_file``. Returns ``{"weights_file",
    "weights_bytes", "tensors", "shared"}``: the file's size, the distinct tensors in it, and
    how many initializers pointed at a tensor another one already stored."""
    import onnx
    import onnx.numpy_helper

    stored: dict = {}    # content key -> (offset, length)
    shared = 0
    path = os.path.join(out_dir, weights_file)
    with open(path, "wb") as blob:
        for name in graph_files:
            graph_path = os.path.join(out_dir, name)
            model = onnx.load(graph_path)  # external data of an earlier pass loads too
            for t in model.graph.initializer:
                raw = t.raw_data if t.HasField("raw_data") else \
                    onnx.numpy_helper.to_array(t).tobytes()
                if len(raw) < min_bytes:
                    continue
                key = (t.data_type, tuple(t.dims), hashlib.sha256(raw).hexdigest())
                if key in stored:
                    shared += 1
                else:
                    pad = -blob.tell() % ALIGN
                    blob.write(b"\0" * pad)
                    stored[key] = (blob.tell(), len(raw))
                    blob.write(raw)
                offset, length = stored[key]
                # The bytes now live in the weights file: the tensor keeps its name, type
                # and shape, and says where its data is.
                for f in ("float_data", "int32_data", "int64_data", "double_data",
                          "uint64_data", "string_data"):
                    t.ClearField(f)
                t.ClearField("raw_data")
                del t.external_data[:]
                for k, v in (("location", weights_file), ("offset", offset), ("length", length)):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, str(v)
                t.data_location = onnx.TensorProto.EXTERNAL
            onnx.save(model, graph_path)
    return {"weights_file": weights_file, "weights_bytes": os.path.getsize(path),
            "tensors": len(stored), "shared": shared}
