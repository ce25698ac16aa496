"""Qwen2.5-VL for mmzoo (registered as ``qwen2_5_vl`` through the ``mmzoo`` entry point)."""
