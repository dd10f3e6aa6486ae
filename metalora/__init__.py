"""metalora: meta-learned, hierarchical LoRA priors for few-shot identity personalization in JAX/Flax."""

__version__ = "0.1.0"
