"""Training: the loop, optimizer and schedule, and training checkpoints (``checkpoint``)."""
