"""Placeholder until the k_quants quantizers land."""
