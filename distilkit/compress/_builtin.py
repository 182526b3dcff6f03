"""Imports every built-in compression method so that each registers itself."""
from distilkit.compress import quantize  # noqa: F401
from distilkit.compress import lstm_projection  # noqa: F401
from distilkit.compress import prune, magnitude, low_rank  # noqa: F401
from distilkit.compress import vocab  # noqa: F401
