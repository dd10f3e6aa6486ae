"""End to end at smoke size: meta-train D (exact resume), then adapt held-out identities and export them."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import meta_lora_tiny
from experiments import adapt, meta_train


def smoke_config(**overrides):
    config = meta_lora_tiny.get_config("smoke")
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(config[section], name, value)
    return config


@pytest.fixture(scope="module")
def meta_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("meta")
    results = meta_train.main(smoke_config(), workdir)
    assert results["finished"] and results["step"] == 4
    return workdir


def test_meta_train_resume_is_bit_identical(meta_workdir, tmp_path):
    stopped = meta_train.main(smoke_config(**{"train.stop_at": 2}), tmp_path)
    assert not (tmp_path / "meta_down").exists()  # interrupted: no final D yet
    assert stopped["wall_time_s_total"] == stopped["wall_time_s"]
    resumed = meta_train.main(smoke_config(), tmp_path)
    assert resumed["start_step"] == 2 and resumed["finished"]
    # The reported time covers both invocations; a rerun of the finished job adds its (no-op) seconds to it.
    assert resumed["wall_time_s_total"] == pytest.approx(stopped["wall_time_s"] + resumed["wall_time_s"])
    rerun = meta_train.main(smoke_config(), tmp_path)
    assert rerun["start_step"] == 4
    assert rerun["wall_time_s_total"] == pytest.approx(resumed["wall_time_s_total"] + rerun["wall_time_s"])
    straight = load_file(str(meta_workdir / "meta_down" / "meta_down.safetensors"))
    again = load_file(str(tmp_path / "meta_down" / "meta_down.safetensors"))
    assert straight.keys() == again.keys() and straight
    for key in straight:
        np.testing.assert_array_equal(straight[key], again[key], err_msg=key)


@pytest.mark.parametrize("method", ["meta_lora", "lora"])
def test_adapt_exports_and_keeps_d_frozen(meta_workdir, method):
    config = smoke_config(**{"lora.method": method})
    results = adapt.main(config, meta_workdir)
    out = meta_workdir / f"adapt_{method}"
    assert results["subjects"] == 2 and (out / "samples.png").is_file()
    assert json.loads((out / "results.json").read_text())["identities"] == results["identities"]
    d_file = load_file(str(meta_workdir / "meta_down" / "meta_down.safetensors"))
    for identity in results["identities"]:
        lora = load_file(str(out / f"subject_{identity}" / "pytorch_lora_weights.safetensors"))
        down = {k: v for k, v in lora.items() if k.endswith("lora_A.weight")}
        assert down and all(k.startswith("unet.") for k in lora)
        if method == "meta_lora":  # every subject's exported A is exactly the meta-trained D
            for key, value in d_file.items():
                exported = lora["unet." + key.rsplit(".", 1)[0] + ".lora_A.weight"]
                np.testing.assert_array_equal(exported.reshape(value.T.shape), value.T, err_msg=key)
    assert np.isfinite(results["heldout_loss_after"]).all()


def test_joint_head_table_defaults_to_one_head_per_identity():
    config = meta_lora_tiny.get_config("")
    config.meta.num_heads, config.meta.num_identities = 0, 37
    assert meta_train.meta_config(config).num_heads == 37
    config.meta.num_heads = 5  # explicit: identities share rows (identity % 5)
    assert meta_train.meta_config(config).num_heads == 5
    config.meta.num_heads, config.meta.num_identities = 0, 0
    with pytest.raises(ValueError, match="num_identities"):
        meta_train.meta_config(config)
