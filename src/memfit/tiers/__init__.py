"""Slow-tier storage: durable files, safetensors stores, byte-budgeted caches, prefetch. Imports nothing above it."""
