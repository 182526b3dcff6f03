"""Imports every built-in compression method so that each registers itself."""
