"""Noise schedules and scheduler configs vs diffusers (torch, float32)."""

import json

import numpy as np
import pytest
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from metalora.diffusion import (
    FlowMatchSchedule,
    NoiseSchedule,
    SchedulerConfigError,
    inference_timesteps,
    load_scheduler_config,
    schedule_from_pretrained,
)

SCHEDULES = [
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
]


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("cfg", SCHEDULES, ids=lambda c: c["beta_schedule"])
@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DDPMScheduler])
def test_betas_and_alphas_cumprod_match_diffusers(cfg, rescale, scheduler_cls):
    ref = scheduler_cls(**cfg, rescale_betas_zero_snr=rescale)
    ours = NoiseSchedule.create(**cfg, rescale_betas_zero_snr=rescale)
    # diffusers rescales in float32, where ᾱ_t/ᾱ_{t-1} cancels badly (betas off by up to 5e-7 absolute); we
    # rescale in float64 (max difference 7e-6, at t=997 of scaled_linear). Without the rescale both agree to
    # float32 rounding.
    beta_atol = 1e-5 if rescale else 1e-7
    np.testing.assert_allclose(np.asarray(ours.betas), ref.betas.numpy(), rtol=1e-5, atol=beta_atol)
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-6)
    if rescale:  # zero terminal SNR is the point of the rescale
        assert float(ours.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-12)
        assert float(ours.snr[-1]) == pytest.approx(0.0, abs=1e-12)


def test_final_alpha_cumprod_follows_set_alpha_to_one():
    for flag in (True, False):
        ref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=flag)
        ours = NoiseSchedule.create(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=flag
        )
        assert float(ours.final_alpha_cumprod) == pytest.approx(float(ref.final_alpha_cumprod), rel=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 3, 7, 10, 25, 50, 999, 1000])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_inference_timesteps_match_ddim_and_ddpm(spacing, num_steps, steps_offset):
    if spacing == "leading" and num_steps == 1000 and steps_offset == 1:
        # diffusers returns timestep 1000 here, which its own step() then indexes out of bounds; we refuse.
        with pytest.raises(ValueError, match="steps_offset"):
            inference_timesteps(1000, num_steps, spacing, steps_offset)
        return
    ours = inference_timesteps(1000, num_steps, spacing, steps_offset)
    for cls in (DDIMScheduler, DDPMScheduler):
        ref = cls(timestep_spacing=spacing, steps_offset=steps_offset)
        ref.set_timesteps(num_steps)
        np.testing.assert_array_equal(ours, ref.timesteps.numpy())
    assert ours.dtype == np.int64 and len(ours) == num_steps
    assert np.all(np.diff(ours) < 0)


def test_inference_timesteps_reject_bad_requests():
    with pytest.raises(ValueError, match="num_inference_steps"):
        inference_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="steps_offset"):
        inference_timesteps(1000, 1, "leading", steps_offset=1000)
    with pytest.raises(SchedulerConfigError, match="timestep_spacing"):
        inference_timesteps(1000, 10, "karras")


SD15_CONFIG = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def test_from_config_reads_sd15_config():
    ours = NoiseSchedule.from_config(SD15_CONFIG)
    ref = DDIMScheduler.from_config(SD15_CONFIG)
    assert (ours.beta_schedule, ours.steps_offset, ours.set_alpha_to_one, ours.clip_sample) == (
        "scaled_linear",
        1,
        False,
        False,
    )
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7)
    ref.set_timesteps(50)
    np.testing.assert_array_equal(ours.inference_timesteps(50), ref.timesteps.numpy())


def test_missing_fields_take_diffusers_defaults():
    ours = NoiseSchedule.from_config({})
    ref = DDIMScheduler()
    for name in ("prediction_type", "timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample"):
        assert getattr(ours, name) == ref.config[name], name
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("beta_schedule", "sigmoid"),
        ("prediction_type", "flow"),
        ("timestep_spacing", "karras"),
        ("variance_type", "learned_range"),
        ("thresholding", True),
        ("trained_betas", [0.1, 0.2]),
        ("use_karras_sigmas", True),
        ("num_train_timesteps", 1),
        ("beta_end", 1.5),
        ("some_new_option", 3),
    ],
)
def test_unsupported_config_values_name_the_field(field, value):
    with pytest.raises(SchedulerConfigError, match=field) as info:
        NoiseSchedule.from_config({**SD15_CONFIG, field: value}, source="my/scheduler_config.json")
    assert "my/scheduler_config.json" in str(info.value)


def test_to_config_round_trips_through_ours_and_diffusers():
    ours = NoiseSchedule.create(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        clip_sample=False,
    )
    again = NoiseSchedule.from_config(ours.to_config())
    assert again.to_config() == ours.to_config()
    np.testing.assert_array_equal(np.asarray(again.alphas_cumprod), np.asarray(ours.alphas_cumprod))
    ref = DDIMScheduler.from_config({k: v for k, v in ours.to_config().items() if k != "variance_type"})
    assert ref.config.prediction_type == "v_prediction"
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7)


def test_pipeline_folder_config(tmp_path):
    # A config written by diffusers itself, in the layout of a pipeline folder.
    DDIMScheduler(**SCHEDULES[1], prediction_type="v_prediction", clip_sample=False).save_config(tmp_path / "scheduler")
    schedule = schedule_from_pretrained(tmp_path)
    assert isinstance(schedule, NoiseSchedule)
    assert schedule.prediction_type == "v_prediction" and schedule.beta_schedule == "scaled_linear"
    assert load_scheduler_config(tmp_path / "scheduler")["_class_name"] == "DDIMScheduler"

    flow_dir = tmp_path / "flux"
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(flow_dir / "scheduler")
    flow = schedule_from_pretrained(flow_dir)
    assert isinstance(flow, FlowMatchSchedule) and flow.shift == 3.0

    with pytest.raises(FileNotFoundError, match=r"scheduler_config\.json"):
        load_scheduler_config(tmp_path / "nowhere")
    bad = tmp_path / "bad" / "scheduler"
    bad.mkdir(parents=True)
    (bad / "scheduler_config.json").write_text("{not json")
    with pytest.raises(SchedulerConfigError, match="not valid JSON"):
        load_scheduler_config(tmp_path / "bad")
    (bad / "scheduler_config.json").write_text(json.dumps({**SD15_CONFIG, "thresholding": True}))
    with pytest.raises(SchedulerConfigError, match=r"bad.*thresholding"):
        schedule_from_pretrained(tmp_path / "bad")


def test_schedule_is_a_pytree_with_static_config():
    import jax

    schedule = NoiseSchedule.create(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    leaves, treedef = jax.tree.flatten(schedule)
    assert len(leaves) == 2  # betas, alphas_cumprod
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert rebuilt.to_config() == schedule.to_config()
    other = NoiseSchedule.create(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    assert jax.tree.structure(other) != treedef  # static fields are part of the jit cache key


# ---------------------------------------------------------------------------------------------------------------
# Flow matching
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 4, 28, 50])
def test_flow_sigmas_and_timesteps_match_diffusers(shift, num_steps):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(num_steps)
    ours = FlowMatchSchedule(shift=shift)
    sigmas = ours.inference_sigmas(num_steps)
    np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sigmas[:-1] * ours.num_train_timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=1e-4)
    assert sigmas[0] == pytest.approx(1.0) and sigmas[-1] == 0.0


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
def test_flow_dynamic_shifting_matches_diffusers(time_shift_type):
    config = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, time_shift_type=time_shift_type)
    ref = FlowMatchEulerDiscreteScheduler(**config)
    ours = FlowMatchSchedule.from_config(ref.config)
    mu = ours.mu_for_seq_len(1024)
    assert mu == pytest.approx(0.5 + (1.15 - 0.5) * (1024 - 256) / (4096 - 256))
    mu = mu if time_shift_type == "exponential" else float(np.exp(mu))  # the linear type takes a positive mu
    ref.set_timesteps(20, mu=mu)
    np.testing.assert_allclose(ours.inference_sigmas(20, mu=mu), ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="mu"):
        ours.inference_sigmas(20)


def test_flow_config_rejects_unsupported_fields():
    with pytest.raises(SchedulerConfigError, match="stochastic_sampling"):
        FlowMatchSchedule.from_config({"shift": 3.0, "stochastic_sampling": True})
    with pytest.raises(SchedulerConfigError, match="shift"):
        FlowMatchSchedule.from_config({"shift": -1.0})
    with pytest.raises(SchedulerConfigError, match="invert_sigmas"):
        FlowMatchSchedule.from_config({"invert_sigmas": True})
