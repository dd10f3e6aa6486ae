"""Test-session setup shared by every test.

* 8 simulated CPU devices, so sharded code runs in the default test run. The flag must be set before
  jax is imported anywhere; single-device tests are unaffected (they run on device 0).
* JAX's persistent compilation cache: compile time dominates small CPU runs, and CI reruns the same
  programs, so cached executables cut the suite's wall time substantially.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import pytest

_CACHE_DIR = pathlib.Path(os.environ.get("METALORA_JAX_CACHE", pathlib.Path.home() / ".cache" / "metalora" / "jax"))

jax.config.update("jax_compilation_cache_dir", str(_CACHE_DIR))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def lfw_root() -> pathlib.Path:
    """Path of the real-photo track; tests that need it skip when it is absent."""
    root = pathlib.Path(os.environ.get("METALORA_LFW", pathlib.Path(__file__).resolve().parents[2] / "shared/data/lfw"))
    if not root.is_dir():
        pytest.skip(f"LFW photos not found at {root} (set METALORA_LFW to their folder)")
    return root
