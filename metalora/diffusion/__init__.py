"""Diffusion math as small pure functions: noise schedules, forward process and targets, losses, samplers.

Typical training step (discrete schedule)::

    schedule = NoiseSchedule.from_config(config)                 # or schedule_from_pretrained(folder)
    k_t, k_eps = jax.random.split(key)
    t = sample_timesteps(k_t, batch, schedule.num_train_timesteps)
    noise = jax.random.normal(k_eps, x0.shape)
    pred = model_fn(params, add_noise(schedule, x0, noise, t), t, cond)
    loss = diffusion_loss(pred, training_target(schedule, x0, noise, t), loss_weights(schedule, t, 5.0))

Sampling: ``ddim_sample`` / ``ddpm_sample`` / ``flow_euler_sample`` with ``model_fn(params, x, t, cond)``.
"""

from metalora.diffusion.forward import (
    add_noise,
    alpha_bar_at,
    eps_to_x0,
    flow_add_noise,
    flow_target,
    flow_velocity_to_x0,
    get_velocity,
    prediction_to_x0_eps,
    training_target,
    v_to_eps,
    v_to_x0,
    x0_eps_to_v,
    x0_to_eps,
)
from metalora.diffusion.losses import (
    diffusion_loss,
    loss_weights,
    min_snr_weights,
    per_example_mse,
    sample_flow_sigmas,
    sample_timesteps,
    snr,
)
from metalora.diffusion.samplers import (
    ModelFn,
    ddim_prev_timesteps,
    ddim_sample,
    ddim_step,
    ddpm_prev_timesteps,
    ddpm_sample,
    ddpm_step,
    flow_euler_sample,
    flow_euler_step,
    guided_prediction,
    initial_noise,
    repeat_for_seeds,
)
from metalora.diffusion.schedules import (
    FlowMatchSchedule,
    NoiseSchedule,
    SchedulerConfigError,
    inference_timesteps,
    linear_betas,
    load_scheduler_config,
    make_betas,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
    schedule_from_pretrained,
    squaredcos_cap_v2_betas,
)

__all__ = [
    "FlowMatchSchedule",
    "ModelFn",
    "NoiseSchedule",
    "SchedulerConfigError",
    "add_noise",
    "alpha_bar_at",
    "ddim_prev_timesteps",
    "ddim_sample",
    "ddim_step",
    "ddpm_prev_timesteps",
    "ddpm_sample",
    "ddpm_step",
    "diffusion_loss",
    "eps_to_x0",
    "flow_add_noise",
    "flow_euler_sample",
    "flow_euler_step",
    "flow_target",
    "flow_velocity_to_x0",
    "get_velocity",
    "guided_prediction",
    "inference_timesteps",
    "initial_noise",
    "linear_betas",
    "load_scheduler_config",
    "loss_weights",
    "make_betas",
    "min_snr_weights",
    "per_example_mse",
    "prediction_to_x0_eps",
    "repeat_for_seeds",
    "rescale_zero_terminal_snr",
    "sample_flow_sigmas",
    "sample_timesteps",
    "scaled_linear_betas",
    "schedule_from_pretrained",
    "snr",
    "squaredcos_cap_v2_betas",
    "training_target",
    "v_to_eps",
    "v_to_x0",
    "x0_eps_to_v",
    "x0_to_eps",
]
