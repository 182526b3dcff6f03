"""A model that claims to live on another device, for testing device placement without a GPU.

:class:`FakeDeviceModel` wraps a tiny model that really runs on the CPU, reports a different
``device`` (``meta`` by default, as a model that accelerate put on a GPU reports ``cuda``),
and raises if any input tensor is not on that device: code that feeds a model CPU tensors
regardless of where it lives fails against it, code that uses the model's own device passes.

Tensors on the ``meta`` device carry shapes but no values, so the wrapper cannot pass the
caller's values on: it runs the wrapped model on inputs of the same shapes and dtypes (token
id 1 everywhere, masks of ones) and returns its real CPU outputs. Tests built on it check
placement, batching and shapes; values are checked by the CPU tests of the real model.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class FakeDeviceModel(nn.Module):
    """``model`` behind a ``device`` attribute that says ``device``; counts its calls."""

    def __init__(self, model: nn.Module, device: str = "meta"):
        super().__init__()
        self.inner = model
        self.fake_device = torch.device(device)
        self.calls = 0  # forward and generate calls that got inputs on the fake device

    @property
    def device(self) -> torch.device:
        return self.fake_device

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # config, generation_config, ...: the wrapped model's
            return getattr(super().__getattr__("inner"), name)

    def _placeholders(self, value: Any, where: str) -> Any:
        if torch.is_tensor(value):
            if value.device != self.fake_device:
                raise RuntimeError(f"{where}: input on {value.device}, but the model is on "
                                   f"{self.fake_device}")
            return torch.ones(value.shape, dtype=value.dtype)
        if isinstance(value, dict):
            return {k: self._placeholders(v, f"{where}[{k!r}]") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._placeholders(v, f"{where}[{i}]") for i, v in enumerate(value))
        return value

    def _inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.calls += 1
        return self._placeholders(args, "args"), self._placeholders(kwargs, "kwargs")

    def forward(self, *args, **kwargs):
        args, kwargs = self._inputs(args, kwargs)
        return self.inner(*args, **kwargs)

    def generate(self, *args, **kwargs):
        args, kwargs = self._inputs(args, kwargs)
        return self.inner.generate(*args, **kwargs)
