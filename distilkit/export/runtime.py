"""What every ONNX export shares: the file names, the opset, and onnxruntime, imported only
when an export or an exported model is used (importing distilkit never needs it)."""
from __future__ import annotations

from typing import Optional

FP32_FILE, INT8_FILE, NBITS_FILE = "model.onnx", "model_int8.onnx", "model_4bit.onnx"
REPORT_FILE = "export.json"
OPSET = 17
INSTALL_HINT = "pip install 'distilkit[onnx]' (or: pip install onnx onnxruntime onnxscript)"


def require_onnx():
    """The onnxruntime module, or an ImportError that says what to install."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnx and onnxruntime ({e}); {INSTALL_HINT}") from e
    return onnxruntime


# onnxruntime's load-time fusion of a residual Add and its LayerNormalization into
# SkipLayerNormalization: that CPU kernel (onnxruntime 1.32) took 2 ms a layer where Add +
# LayerNormalization take 0.4 ms (batch 32, length 64, width 384), so the fp32 quickstart
# student ran 13% and its int8 file 17% faster without it (docs/RESULTS.md, #15). Serve the
# files the same way: ``ort.InferenceSession(path, disabled_optimizers=DISABLED_OPTIMIZERS)``.
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


# How long onnxruntime's worker threads may busy-wait for work when models are timed side by
# side. Measured on the int8 quickstart student (batch 32, length 64, 2 threads, onnxruntime
# 1.32, 2026-12-03): with onnxruntime's default the workers keep spinning for 10-20 ms after a
# run, so a PyTorch model timed right after it ran at half speed (three 2048x384x1536 matmuls:
# 34.8 ms against 16.5 alone); with no spinning that leak is gone but the model itself ran 20%
# slower at batch 32 (29.3 against 24.1 ms) and 45% at batch 1 (1.72 against 1.19 ms), as
# every op waits for woken threads. Spinning at most 1 ms keeps the in-run speed (23.8 and
# 1.12 ms) and leaks almost nothing (19.0 ms right after a run, 17.2 ms 2 ms later).
TIMING_SPIN_US = 1000


def session(path: str, threads: Optional[int] = None, spin_us: Optional[int] = None):
    """A CPU inference session on ``path`` (``threads`` intra-op threads, else onnxruntime's
    default), with onnxruntime's own log quiet below errors. ``spin_us``: how long its worker
    threads busy-wait for the next piece of work; ``None`` leaves onnxruntime's default (a
    server's setting: they spin for milliseconds after a run), ``0`` turns spinning off, and
    side-by-side timings pass :data:`TIMING_SPIN_US`, which keeps a run as fast as with the
    default but lets a model timed right after it have the cores."""
    ort = require_onnx()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    if spin_us is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_us else "0")
        if spin_us:
            opts.add_session_config_entry("session.intra_op.spin_duration_us", str(int(spin_us)))
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(DISABLED_OPTIMIZERS))


def quantize_int8(src: str, dst: str, per_channel: bool = False) -> None:
    """onnxruntime's dynamic int8 quantization of the graph ``src`` into ``dst``: weights
    int8 (one scale per tensor, or per output channel), activations quantized per call
    (uint8), the scheme every ``--int8`` file uses.
    Its advice to run onnxruntime's pre-processing first (a root-logger warning on every call)
    is silenced: the graphs distilkit exports carry their shapes already."""
    import logging

    require_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        # DefaultTensorType: the types of fused contrib ops' outputs, which onnx's shape
        # inference does not know, are float.
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=per_channel,
                         extra_options={"DefaultTensorType": 1})
    finally:
        root.setLevel(level)
