"""LoRA adapters on mmzoo's layers (attached with ``peft``): training, checkpoints, export and import."""
