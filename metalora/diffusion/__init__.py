"""Diffusion math as small pure functions: noise schedules, forward process and targets, losses, samplers.

Typical training step (discrete schedule)::

    schedule = NoiseSchedule.from_config(config)                 # or schedule_from_pretrained(folder)
    x_t, t, target = training_inputs(schedule, jax.random.fold_in(rng, step), x0)
    pred = model_fn(params, x_t, t, cond)
    loss = diffusion_loss(pred, target, loss_weights(schedule, t, min_snr_gamma=5.0))

Sampling: ``ddim_sample`` / ``ddpm_sample`` / ``flow_euler_sample`` with ``model_fn(params, x, t, cond)``;
define ``model_fn`` once (it is a static jit argument, a fresh lambda per call would recompile) and pass the
weights as ``params``.
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
    flow_training_inputs,
    loss_weights,
    min_snr_weights,
    per_example_mse,
    sample_flow_sigmas,
    sample_timesteps,
    snr,
    training_inputs,
    training_noise,
)
from metalora.diffusion.samplers import (
    ModelFn,
    ddim_edit,
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
    "ddim_edit",
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
    "flow_training_inputs",
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
    "training_inputs",
    "training_noise",
    "training_target",
    "v_to_eps",
    "v_to_x0",
    "x0_eps_to_v",
    "x0_to_eps",
]
