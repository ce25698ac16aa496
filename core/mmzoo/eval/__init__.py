"""Benchmarks: VLMEvalKit TSV reading, prompts, scoring rules, the evaluation loop and reports."""
