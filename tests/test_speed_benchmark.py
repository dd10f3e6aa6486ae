"""Smoke test of the speed benchmark's ``sampling``, ``efficiency`` and ``conv`` sections at tiny sizes (numbers
not judged)."""

import json
import math

from benchmarks.speed import main

ROW_KEYS = {
    "sampling": {"impl", "images_per_s", "ms_per_image", "speedup_vs_torch", "max_abs_diff_vs_torch"},
    "efficiency": {"what", "gflop_per_step", "ms_per_step", "achieved_gflops", "peak_matmul_gflops",
                   "fraction_of_peak"},
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
    assert [row["impl"] for row in results["conv"]] == ["jax.jit (XLA defaults)", "metalora.compiler.jit",
                                                        "torch conv2d"]
