"""Checkpoint formats on disk: HF directories, mm shards (safetensors or MindSpeed-MM's .pt),
the iteration tracker, and the conversions between them."""
