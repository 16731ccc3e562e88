"""Fallback aggregation (compact)."""
