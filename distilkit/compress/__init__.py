"""Compression methods: ``compress_(model, config)`` applies one in place; see
:mod:`distilkit.compress.base` for the lifecycle and the save/load contract."""
from distilkit.compress.base import (
    CompressionContext,
    Method,
    check_order,
    compress_,
    compression_records,
    config_from_dict,
    finalize_,
    get_method,
    is_plain_linear,
    load_compressed,
    method_names,
    register,
    save_compressed,
    select_modules,
    set_module,
    unwrap,
)

__all__ = [
    "CompressionContext", "Method", "compress_", "compression_records", "config_from_dict",
    "finalize_", "get_method", "load_compressed", "method_names", "register",
    "save_compressed", "select_modules", "set_module", "check_order", "is_plain_linear",
    "unwrap",
]
