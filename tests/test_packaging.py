"""The dependency ranges pyproject.toml declares start at the versions CI installs and tests
(scripts/install.sh pins them): a range that admits older, untested releases lets pip resolve a
transformers or accelerate that lacks what DistilTrainer uses."""
import os
import re

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _pins() -> dict:
    text = open(os.path.join(ROOT, "scripts", "install.sh")).read()
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r'"([A-Za-z0-9_.-]+)==([0-9.]+)"', text)}


def _lower_bounds() -> dict:
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)', deps)}


def _v(s: str) -> tuple:
    return tuple(int(p) for p in s.split("."))


def test_lower_bounds_are_the_tested_versions():
    pins, lows = _pins(), _lower_bounds()
    for name in ("torch", "transformers", "datasets", "accelerate", "peft", "huggingface-hub"):
        assert name in pins and name in lows, name
        # The bound is the pin itself (a trailing ".0" may be left out of the bound).
        low = _v(lows[name])
        assert low == _v(pins[name])[:len(low)], (name, lows[name], pins[name])
