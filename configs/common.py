"""Config blocks that several jobs share, so a change to their meaning is made once."""

from __future__ import annotations

import ml_collections


def optimizer(learning_rate: float, *, warmup_steps: int = 20, end_lr_ratio: float = 0.1) -> ml_collections.ConfigDict:
    """AdamW with linear warm-up, then cosine decay over the whole run (the keys of ``metalora.train.optim``)."""
    c = ml_collections.ConfigDict()
    c.learning_rate = learning_rate
    c.warmup_steps = warmup_steps
    c.total_steps = 0  # 0 = train.steps
    c.end_lr_ratio = end_lr_ratio
    c.weight_decay = 0.0
    c.grad_clip_norm = 1.0
    return c
