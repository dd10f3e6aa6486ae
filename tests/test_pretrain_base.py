"""The pretraining job end to end at smoke size: CLI, outputs, exact resume, data batches, config errors, LFW track.

Runs go through the real CLI in subprocesses (as a user runs them), each compiling afresh.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from metalora.config_utils import parse_cli
from metalora.models import base_model as bm

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A private tfds cache (the smoke dataset of 22 identities is built on first use, ~2 s)."""
    return tmp_path_factory.mktemp("tfds")


def _run(workdir, data_dir, *overrides, config="configs/base_tiny.py:smoke", check=True):
    # Fresh compiles, no persistent compilation cache: with a shared JAX_COMPILATION_CACHE_DIR the resumed run was
    # seen to differ from the straight one (under investigation); without it the runs are bit-identical.
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    cmd = [sys.executable, "-m", "experiments.pretrain_base", "--config", config, "--workdir", str(workdir),
           f"--config.data.data_dir={data_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("straight")
    _run(workdir, data_dir)
    return workdir


def test_smoke_run_writes_every_output(straight):
    results = json.loads((straight / "results.json").read_text())
    assert results["finished"] and results["step"] == 4
    assert np.isfinite(results["final_metrics"]["train/loss"])
    assert (straight / "samples" / "samples_0000004.png").is_file()
    assert any((straight / "tensorboard").iterdir())
    assert sorted(int(p.name) for p in (straight / "checkpoints").iterdir() if p.name.isdigit())[-1] == 4
    model, params = bm.load_base_model(straight / "base_model")
    assert model.config.unet.block_out_channels == (32, 32)
    index = json.loads((straight / "base_model" / "model_index.json").read_text())
    assert index["extra"]["seed"] == 0 and index["extra"]["steps"] == 4
    images = bm.sample(model, params, ["a photo of a person"], bm.jax.random.key(0)[None], num_inference_steps=2)
    assert images.shape == (1, 32, 32, 3)


def _tensors(folder):
    from safetensors.numpy import load_file

    return {part: load_file(folder / part / name) for part, name in
            (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors"))}


@pytest.mark.slow  # three CLI runs, each compiling the smoke model (~1 min apiece on 2 idle cores)
def test_stop_and_resume_is_bit_identical(straight, tmp_path, data_dir):
    """Stop after 2 of 4 steps (checkpoint, as on preemption), rerun the same command: the exported EMA weights,
    which depend on every step's parameters, equal the uninterrupted run's bit for bit."""
    resumed = tmp_path / "resumed"
    _run(resumed, data_dir, "--config.train.stop_at=2", "--config.train.sample_every=0")
    first = json.loads((resumed / "results.json").read_text())
    assert first["step"] == 2 and not first["finished"] and not (resumed / "base_model").exists()
    _run(resumed, data_dir, "--config.train.sample_every=0")
    second = json.loads((resumed / "results.json").read_text())
    assert second["start_step"] == 2 and second["finished"]
    a, b = _tensors(straight / "base_model"), _tensors(resumed / "base_model")
    for part in a:
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            np.testing.assert_array_equal(a[part][k], b[part][k], err_msg=f"{part}/{k}")
    assert second["final_metrics"]["train/loss"] == json.loads((straight / "results.json").read_text())[
        "final_metrics"]["train/loss"]


def test_batches_are_deterministic_and_resume_from_state(data_dir):
    from configs import base_tiny
    from experiments import pretrain_base

    config = base_tiny.get_config("smoke")
    config.data.data_dir = str(data_dir)
    tok = bm.world_tokenizer()
    it = pretrain_base.make_data(config, tok)
    b0 = next(it)
    state = it.get_state()
    b1, b2 = next(it), next(it)
    assert b0["images"].shape == (4, 32, 32, 3) and b0["images"].dtype == np.float32
    assert -1.0 <= b0["images"].min() and b0["images"].max() <= 1.0
    assert b0["input_ids"].shape == (4, tok.max_length)
    assert all(tok.decode(row).startswith("a photo of a person") for row in b0["input_ids"])
    again = pretrain_base.make_data(config, tok)
    again.set_state(state)
    for want in (b1, b2):
        got = next(again)
        np.testing.assert_array_equal(got["images"], want["images"])
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])


def test_unknown_config_key_is_a_clear_cli_error(tmp_path, data_dir):
    proc = _run(tmp_path, data_dir, "--config.train.stepz=3", check=False)
    assert proc.returncode == 2
    assert "unknown config key 'train.stepz'" in proc.stderr and "steps" in proc.stderr


def test_configs_parse_with_overrides():
    args = parse_cli(["prog", "--config", str(REPO / "configs/base_tiny.py"), "--workdir", "/tmp/x",
                      "--config.train.steps=7"])
    assert args.config.train.steps == 7 and args.config.data.source == "synth"
    lfw = parse_cli(["prog", "--config", str(REPO / "configs/base_lfw.py:smoke"), "--workdir", "/tmp/x"]).config
    assert lfw.data.source == "folders" and set(lfw.sample.prompts) == {"a photo of a person"}


@pytest.mark.slow
@pytest.mark.lfw
def test_lfw_smoke_run(lfw_root, tmp_path, data_dir):
    workdir = tmp_path / "lfw"
    _run(workdir, data_dir, f"--config.data.folder_root={lfw_root}", config="configs/base_lfw.py:smoke")
    assert json.loads((workdir / "results.json").read_text())["finished"]
    assert (workdir / "samples" / "samples_0000004.png").is_file()
