"""Placeholder until the legacy quantizers land."""
