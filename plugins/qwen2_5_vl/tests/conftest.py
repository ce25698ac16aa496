"""Fixtures shared by the Qwen2.5-VL plugin tests (helpers live in tiny_hf.py)."""

from tiny_hf import hello_dir, hf_dir, hf_model, hf_tied, hf_untied, pair

__all__ = ["hello_dir", "hf_dir", "hf_model", "hf_tied", "hf_untied", "pair"]
