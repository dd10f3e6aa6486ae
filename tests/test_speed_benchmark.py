"""Smoke test of the speed benchmark's ``sampling``, ``efficiency`` and ``conv`` sections at tiny sizes (numbers
not judged)."""

import json
import math

import pytest

from benchmarks.speed import main

ROW_KEYS = {
    "sampling": {"impl", "images_per_s", "ms_per_image", "speedup_vs_torch", "max_abs_diff_vs_torch"},
    "efficiency": {"what", "gflop_per_step", "ms_per_step", "achieved_gflops", "peak_matmul_gflops",
                   "fraction_of_peak", "ms_at_peak"},
    "conv": {"impl", "fwd_ms", "fwd_bwd_ms"},
}


def test_sampling_efficiency_and_conv_sections(tmp_path):
    out = tmp_path / "speed.json"
    main(["--batch", "1", "--size", "16", "--tokens", "64", "--repeats", "1", "--sample-steps", "2",
          "--threads", "1", "--sections", "sampling,efficiency,conv", "--out", str(out)])
    results = json.loads(out.read_text())
    for section, keys in ROW_KEYS.items():
        rows = results[section]
        assert rows, section
        for row in rows:
            assert set(row) == keys, (section, row)
            for key, value in row.items():
                if key in ("impl", "what"):
                    continue
                assert math.isfinite(value), (section, key, value)
                # The parity difference may be exactly 0 (the torch row is its own reference); the rest are rates,
                # times and ratios.
                assert value >= 0 if key == "max_abs_diff_vs_torch" else value > 0, (section, key, value)
    # Same weights and noise on both sides: the images agree loosely even at f32 (the benchmark does not assert).
    assert results["sampling"][0]["max_abs_diff_vs_torch"] < 1e-2
    ours, theirs, goal = results["efficiency"]
    # The goal row is our FLOPs in half torch's measured time; both counters see the same model (XLA counts a few
    # elementwise FLOPs that torch's matmul/conv counter leaves out, and its own backward may differ slightly).
    assert math.isclose(goal["ms_per_step"], theirs["ms_per_step"] / 2)
    assert goal["gflop_per_step"] == ours["gflop_per_step"]
    assert 0.5 < ours["gflop_per_step"] / theirs["gflop_per_step"] < 2.0
    assert [row["impl"] for row in results["conv"]] == ["jax.jit (XLA defaults)", "metalora.compiler.jit",
                                                        "torch conv2d"]


def test_batched_adaptation_benchmark_on_the_base_model(tmp_path):
    """benchmarks/subjects.py at smoke size: the base config's UNet, one row per S; XLA's FLOPs of one inner step
    grow exactly with the number of subjects (one vmapped program), the first row is the reference."""
    from benchmarks import subjects

    out = tmp_path / "subjects.json"
    payload = subjects.main(["--base-config", "configs/base_tiny.py:smoke", "--subjects", "1,2", "--steps", "2",
                             "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text())["table"] == payload["table"]
    one, two = payload["rows"]
    assert (one["subjects"], two["subjects"]) == (1, 2) and one["speedup_vs_first"] == 1.0
    assert math.isclose(two["flops_per_step"], 2 * one["flops_per_step"], rel_tol=0.02)
    assert all(math.isfinite(r["subjects_per_s"]) and r["subjects_per_s"] > 0 for r in payload["rows"])
    # The roofline: each row's rate at 100 % of the matmul peak, and what 6 × S=1's rate costs at the largest S.
    peak = payload["peak_gflops_per_s"] * 1e9
    for r in payload["rows"]:
        assert math.isclose(r["fraction_of_peak"], r["gflops_per_s"] * 1e9 / peak)
        assert math.isclose(r["subjects_per_s_at_peak"] / r["subjects_per_s"], 1 / r["fraction_of_peak"], rel_tol=1e-9)
    goal = payload["goal"]
    assert goal["subjects"] == 2 and math.isclose(goal["subjects_per_s"], 6 * one["subjects_per_s"])
    assert math.isclose(goal["needs_gflops_per_s"], 6 * one["gflops_per_s"] * two["flops_per_step"]
                        / (2 * one["flops_per_step"]), rel_tol=1e-9)


@pytest.mark.slow  # two worker processes compiling the base step (~165 s); metalora.host itself: tests/test_host.py
def test_host_allocator_benchmark_alternates_two_workers(tmp_path):
    """benchmarks/host_allocator.py at smoke size: one worker without and one with metalora.host's tunables, each
    reporting one time per turn."""
    from benchmarks import host_allocator
    from metalora import host

    out = tmp_path / "alloc.json"
    payload = host_allocator.main(["--config", "configs/base_tiny.py:smoke", "--turns", "2", "--steps-per-turn", "1",
                                   "--out", str(out)])
    assert json.loads(out.read_text())["table"] == payload["table"]
    default, tuned = payload["rows"]
    assert (default["variant"], tuned["variant"]) == ("default", "tuned")
    assert default["glibc_tunables"] is None
    assert tuned["glibc_tunables"] == ":".join(f"{k}={v}" for k, v in host.MALLOC_TUNABLES.items())
    assert all(len(r["ms_per_step_turns"]) == 2 and math.isfinite(r["ms_per_step"]) for r in payload["rows"])


def test_mixed_precision_lora_steps_train_float32_factors_of_a_bfloat16_unet():
    """``--dtype bfloat16`` (diffusers' LoRA-training recipe on both sides): frozen weights in bfloat16, the trained
    LoRA factors and their updates in float32, a finite float32 loss."""
    import argparse

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from benchmarks.speed import _lora_inputs, _metalora_lora_step, _torch_lora_step

    args = argparse.Namespace(batch=1, size=16, rank=2, dtype="bfloat16")
    x, t, ctx = _lora_inputs(args)
    step, (heads, opt_state), _ = _metalora_lora_step(args, x, t, ctx)
    new_heads, _, loss = step(heads, opt_state)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    assert {a.dtype for a in jax.tree.leaves((heads, new_heads))} == {jnp.dtype(jnp.float32)}
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(new_heads), jax.tree.leaves(heads),
                                                            strict=True)]
    assert max(moved) > 0  # the step trained the float32 factors through the bfloat16 UNet

    unet, torch_step = _torch_lora_step(args, x, t, ctx)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    torch_step(unet)()
    assert {p.dtype for p in trainable} == {torch.float32}
    assert {p.dtype for p in unet.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert any(not torch.equal(p, b) for p, b in zip(trainable, before, strict=True))


def test_bfloat16_sampling_section_compares_the_same_bfloat16_unet(tmp_path):
    """The sampling section with ``--dtype bfloat16``: both samplers run the bfloat16 UNet from the same weights
    and noise, so their images differ by bfloat16 round-off: 0.25 here, measured (each is within 0.21 of the float32
    images, whose values reach 9; diffusers keeps its latents in bfloat16, our sampler in float32)."""
    out = tmp_path / "speed.json"
    main(["--batch", "1", "--size", "16", "--repeats", "1", "--sample-steps", "2", "--threads", "1",
          "--sections", "sampling", "--dtype", "bfloat16", "--out", str(out)])
    ours, theirs = json.loads(out.read_text())["sampling"]
    assert set(ours) == ROW_KEYS["sampling"] and theirs["speedup_vs_torch"] == 1.0
    assert 0 < ours["max_abs_diff_vs_torch"] < 1.0
