"""Meta-LoRA: the inner loop (few-shot adaptation of subject factors) and the outer loops that learn ``D``."""

from metalora.meta.inner import (
    AdaptResult,
    ExampleLoss,
    InnerLoopConfig,
    adapt,
    adapt_subjects,
    diffusion_example_loss,
    heldout_loss,
    inner_optimizer,
    optimize,
    sample_minibatch,
)
from metalora.meta.outer import ALGORITHMS, MetaConfig, head_table_bytes, init_meta_params, make_meta_loss

__all__ = [
    "ALGORITHMS",
    "AdaptResult",
    "ExampleLoss",
    "InnerLoopConfig",
    "MetaConfig",
    "adapt",
    "adapt_subjects",
    "diffusion_example_loss",
    "head_table_bytes",
    "heldout_loss",
    "init_meta_params",
    "inner_optimizer",
    "make_meta_loss",
    "optimize",
    "sample_minibatch",
]
