"""Placeholder until the iq4 quantizers land."""
