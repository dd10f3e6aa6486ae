"""metalora: meta-learned hierarchical LoRA priors for few-shot identity personalization (JAX/Flax)."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "jaxlib>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "chex>=0.1.92",
    "einops>=0.8.2",
    "ml-collections>=1.1.0",
    "tensorflow-datasets>=4.9.10",
    "grain>=0.2.18",
    "transformers>=5.23.0",
    "diffusers>=0.42.1",
    "safetensors>=0.4",
    "numpy>=1.26",
    "pillow>=10.0",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "tensorboardX>=2.6",
]

EXTRAS_REQUIRE = {
    # torch is the numerical reference (diffusers/transformers/PEFT). Exact pin: on our machines 2.13.0 is a
    # local CPU wheel; any other version resolves to a multi-GB CUDA build.
    "test": ["pytest>=8.0", "pytest-xdist>=3.5", "torch==2.13.0", "peft>=0.17", "ruff>=0.6"],
    # Real face-recognition model for the LFW track (dlib ResNet descriptor), installs offline from the registry.
    "faces": ["dlib-bin>=19.24", "face-recognition-models>=0.3.0"],
}

setup(
    name="metalora",
    version="0.1.0",
    description="Meta-learned, hierarchical LoRA priors for few-shot identity personalization in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["metalora", "metalora.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
