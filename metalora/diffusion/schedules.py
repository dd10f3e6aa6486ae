"""Noise schedules: discrete-time DDPM/DDIM schedules and the rectified-flow (flow-matching) schedule.

Two frozen dataclasses describe everything a training step or a sampler needs to know about the noise process:

* :class:`NoiseSchedule` — the variance-preserving discrete process of DDPM/DDIM/Stable Diffusion,
  ``x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε`` for integer ``t ∈ [0, T)``. It is a pytree: ``betas`` and
  ``alphas_cumprod`` are array leaves, every config field is static metadata, so a schedule can be passed to
  ``jax.jit`` as an ordinary argument and the sampler's timesteps (pure functions of the static fields) are
  computed on the host at trace time.
* :class:`FlowMatchSchedule` — the rectified-flow process of SD3/FLUX, ``x_σ = (1-σ)·x0 + σ·noise`` for
  continuous ``σ ∈ [0, 1]``. It has no arrays at all (a leafless pytree).

Both can be built from a diffusers ``scheduler_config.json`` so our numbers mean exactly what diffusers' do. The
beta tables are computed in float64 on the host and rounded to float32 once, which keeps them within a few ulp of
diffusers' float32 tables (the parity tests check ≤1e-6).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

BetaScheduleName = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small",)


class SchedulerConfigError(ValueError):
    """A scheduler config asks for something we do not implement; the message names the field (and file)."""


# ----------------------------------------------------------------------------------------------------------------
# Beta schedules (host-side numpy, float64)
# ----------------------------------------------------------------------------------------------------------------


def linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """DDPM's schedule (Ho et al. 2020): betas evenly spaced from ``beta_start`` to ``beta_end``."""
    return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)


def scaled_linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Stable Diffusion's schedule: sqrt(beta) evenly spaced, then squared (less noise early than ``linear``)."""
    return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2


def squaredcos_cap_v2_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021): ᾱ(t) = cos²((t+s)/(1+s)·π/2), s=0.008.

    Betas are ``1 - ᾱ(t_{i+1})/ᾱ(t_i)`` capped at ``max_beta`` so the last step does not reach ᾱ=0 exactly.
    """

    def alpha_bar(t: np.ndarray) -> np.ndarray:
        return np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    t = np.arange(num_train_timesteps, dtype=np.float64) / num_train_timesteps
    t_next = np.arange(1, num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    return np.minimum(1.0 - alpha_bar(t_next) / alpha_bar(t), max_beta)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(ᾱ) so the last timestep has SNR exactly 0 (Lin et al. 2023, Algorithm 1).

    Keeps sqrt(ᾱ_0) unchanged; pair it with v-prediction, since an epsilon model cannot recover x0 at ᾱ=0.
    """
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alphas_cumprod = sqrt_ab**2
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def make_betas(
    beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float, rescale_betas_zero_snr: bool
) -> np.ndarray:
    """The float64 beta table of a named diffusers schedule."""
    if beta_schedule == "linear":
        betas = linear_betas(num_train_timesteps, beta_start, beta_end)
    elif beta_schedule == "scaled_linear":
        betas = scaled_linear_betas(num_train_timesteps, beta_start, beta_end)
    elif beta_schedule == "squaredcos_cap_v2":
        betas = squaredcos_cap_v2_betas(num_train_timesteps)
    else:
        raise SchedulerConfigError(f"beta_schedule={beta_schedule!r} is not supported; choose one of {BETA_SCHEDULES}")
    return rescale_zero_terminal_snr(betas) if rescale_betas_zero_snr else betas


# ----------------------------------------------------------------------------------------------------------------
# Discrete (DDPM / DDIM) schedule
# ----------------------------------------------------------------------------------------------------------------


def _static(default: Any) -> Any:
    return dataclasses.field(default=default, metadata={"static": True})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A variance-preserving discrete noise schedule plus the diffusers options that govern sampling.

    Build it with :meth:`create` or :meth:`from_config`, not the raw constructor (which does not check that the
    tables agree with the fields). Field names and defaults are diffusers' ``DDIMScheduler``/``DDPMScheduler``
    ones so a config dict means the same thing here and there.
    """

    betas: jax.Array  # (T,) float32
    alphas_cumprod: jax.Array  # (T,) float32, ᾱ_t = Π_{s≤t} (1 - β_s)
    num_train_timesteps: int = _static(1000)
    beta_start: float = _static(0.0001)
    beta_end: float = _static(0.02)
    beta_schedule: str = _static("linear")
    prediction_type: str = _static("epsilon")
    timestep_spacing: str = _static("leading")
    steps_offset: int = _static(0)
    set_alpha_to_one: bool = _static(True)
    clip_sample: bool = _static(True)
    clip_sample_range: float = _static(1.0)
    rescale_betas_zero_snr: bool = _static(False)
    variance_type: str = _static("fixed_small")

    @classmethod
    def create(
        cls,
        *,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        set_alpha_to_one: bool = True,
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        rescale_betas_zero_snr: bool = False,
        variance_type: str = "fixed_small",
    ) -> NoiseSchedule:
        """Validate the fields and compute the float32 tables (diffusers' defaults for every field)."""
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        _check_choice("variance_type", variance_type, VARIANCE_TYPES)
        if int(num_train_timesteps) < 2:
            raise SchedulerConfigError(f"num_train_timesteps must be ≥ 2, got {num_train_timesteps}")
        betas = make_betas(
            beta_schedule, int(num_train_timesteps), float(beta_start), float(beta_end), bool(rescale_betas_zero_snr)
        )
        if not np.all((betas >= 0) & (betas <= 1)):
            raise SchedulerConfigError(
                f"beta_start={beta_start}, beta_end={beta_end} give betas outside [0, 1] for {beta_schedule!r}"
            )
        alphas_cumprod = np.cumprod(1.0 - betas)
        return cls(
            betas=jnp.asarray(betas, jnp.float32),
            alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
            num_train_timesteps=int(num_train_timesteps),
            beta_start=float(beta_start),
            beta_end=float(beta_end),
            beta_schedule=beta_schedule,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=int(steps_offset),
            set_alpha_to_one=bool(set_alpha_to_one),
            clip_sample=bool(clip_sample),
            clip_sample_range=float(clip_sample_range),
            rescale_betas_zero_snr=bool(rescale_betas_zero_snr),
            variance_type=variance_type,
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, source: str = "scheduler config") -> NoiseSchedule:
        """Build from a diffusers scheduler config dict (DDPM, DDIM, PNDM, Euler, ... share these fields).

        Unsupported values raise :class:`SchedulerConfigError` naming the field and ``source``; fields that only
        matter to samplers we do not implement are accepted when they hold their neutral value.
        """
        kwargs = _parse_config(config, _DISCRETE_FIELDS, source)
        try:
            return cls.create(**kwargs)
        except SchedulerConfigError as err:
            raise SchedulerConfigError(f"{source}: {err}") from None

    def to_config(self) -> dict[str, Any]:
        """A diffusers ``DDIMScheduler``-compatible config dict (round-trips through :meth:`from_config`)."""
        return {
            "_class_name": "DDIMScheduler",
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("static")},
            "trained_betas": None,
            "thresholding": False,
        }

    @property
    def final_alpha_cumprod(self) -> jax.Array:
        """ᾱ used for "t = -1" by DDIM's last step: 1 (a clean image) or ᾱ_0 (``set_alpha_to_one=False``)."""
        return jnp.ones((), jnp.float32) if self.set_alpha_to_one else self.alphas_cumprod[0]

    @property
    def snr(self) -> jax.Array:
        """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) for every train timestep, shape (T,)."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    def inference_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Descending int timesteps of a sampling run (diffusers' ``set_timesteps``), computed on the host."""
        return inference_timesteps(
            self.num_train_timesteps, num_inference_steps, self.timestep_spacing, self.steps_offset
        )


def inference_timesteps(
    num_train_timesteps: int, num_inference_steps: int, spacing: str = "leading", steps_offset: int = 0
) -> np.ndarray:
    """The descending int64 timesteps diffusers' DDIM/DDPM ``set_timesteps`` picks for a spacing.

    * ``leading``: multiples of ``T // n`` plus ``steps_offset`` (SD 1.x uses offset 1), never reaches T-1;
    * ``trailing``: counts down from T-1 in steps of ``T / n`` (needed for zero-terminal-SNR schedules);
    * ``linspace``: ``n`` rounded points evenly spaced over [0, T-1].
    """
    num_train_timesteps, n = int(num_train_timesteps), int(num_inference_steps)
    if not 1 <= n <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, {num_train_timesteps}], got {num_inference_steps}")
    if spacing == "linspace":
        ts = np.linspace(0, num_train_timesteps - 1, n).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(n) * (num_train_timesteps // n)).round()[::-1].astype(np.int64) + int(steps_offset)
    elif spacing == "trailing":
        ts = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / n)).astype(np.int64) - 1
    else:
        raise SchedulerConfigError(f"timestep_spacing={spacing!r} is not supported; choose one of {TIMESTEP_SPACINGS}")
    if ts.max() >= num_train_timesteps or ts.min() < 0:
        raise ValueError(
            f"steps_offset={steps_offset} moves timesteps to [{ts.min()}, {ts.max()}], "
            f"outside [0, {num_train_timesteps})"
        )
    return ts.copy()


# ----------------------------------------------------------------------------------------------------------------
# Rectified flow (flow matching) schedule
# ----------------------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FlowMatchSchedule:
    """Rectified flow (SD3/FLUX): ``x_σ = (1-σ)·x0 + σ·noise``, velocity target ``noise - x0``.

    ``shift`` warps σ towards the noisy end, ``σ' = shift·σ / (1 + (shift-1)·σ)`` (SD3 uses 3.0). With
    ``use_dynamic_shifting`` (FLUX) the warp is instead ``e^μ / (e^μ + (1/σ - 1))`` with a per-resolution μ given
    to the sampler. The model is called with timestep ``σ·num_train_timesteps`` (diffusers' convention).
    """

    num_train_timesteps: int = _static(1000)
    shift: float = _static(1.0)
    use_dynamic_shifting: bool = _static(False)
    base_shift: float = _static(0.5)
    max_shift: float = _static(1.15)
    base_image_seq_len: int = _static(256)
    max_image_seq_len: int = _static(4096)
    time_shift_type: str = _static("exponential")

    def __post_init__(self):
        if self.shift <= 0:
            raise SchedulerConfigError(f"shift must be > 0, got {self.shift}")
        _check_choice("time_shift_type", self.time_shift_type, ("exponential", "linear"))

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, source: str = "scheduler config") -> FlowMatchSchedule:
        """Build from a diffusers ``FlowMatchEulerDiscreteScheduler`` config dict."""
        kwargs = _parse_config(config, _FLOW_FIELDS, source)
        try:
            return cls(**kwargs)
        except SchedulerConfigError as err:
            raise SchedulerConfigError(f"{source}: {err}") from None

    def to_config(self) -> dict[str, Any]:
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", **dataclasses.asdict(self)}

    def mu_for_seq_len(self, image_seq_len: int) -> float:
        """FLUX's resolution-dependent μ: linear in the token count between (base, max) seq len/shift."""
        slope = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return self.base_shift + slope * (image_seq_len - self.base_image_seq_len)

    def shift_sigmas(self, sigmas, mu: float | None = None):
        """Apply the configured timestep shift to σ ∈ (0, 1] (numpy or jax arrays)."""
        if self.use_dynamic_shifting:
            if mu is None:
                raise ValueError("use_dynamic_shifting=True needs mu (see FlowMatchSchedule.mu_for_seq_len)")
            scale = math.exp(mu) if self.time_shift_type == "exponential" else mu
            return scale / (scale + (1.0 / sigmas - 1.0))
        return self.shift * sigmas / (1.0 + (self.shift - 1.0) * sigmas)

    def inference_sigmas(self, num_inference_steps: int, mu: float | None = None) -> np.ndarray:
        """σ_0 > ... > σ_{n-1} > σ_n = 0 of an Euler run (n+1 values; diffusers' ``set_timesteps`` sigmas).

        As in diffusers, the unshifted grid runs from 1 down to the *shifted* σ of train step 1, and is then
        shifted, so these equal ``FlowMatchEulerDiscreteScheduler.sigmas`` for the same config.
        """
        n, T = int(num_inference_steps), self.num_train_timesteps
        if n < 1:
            raise ValueError(f"num_inference_steps must be ≥ 1, got {num_inference_steps}")
        train_sigmas = np.linspace(1, T, T, dtype=np.float32)[::-1] / np.float32(T)
        if not self.use_dynamic_shifting:
            s = np.float32(self.shift)
            train_sigmas = s * train_sigmas / (1 + (s - 1) * train_sigmas)
        sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])
        sigmas = np.linspace(sigma_max * T, sigma_min * T, n) / T
        sigmas = np.asarray(self.shift_sigmas(sigmas, mu), np.float32)
        return np.concatenate([sigmas, np.zeros(1, np.float32)])


# ----------------------------------------------------------------------------------------------------------------
# diffusers config parsing
# ----------------------------------------------------------------------------------------------------------------

_ANY = object()  # marker: any value is accepted (the field does not change our math)

# field -> (our kwarg name or None to drop, neutral value we accept when we do not implement the feature)
_DISCRETE_FIELDS: dict[str, tuple[str | None, Any]] = {
    "num_train_timesteps": ("num_train_timesteps", _ANY),
    "beta_start": ("beta_start", _ANY),
    "beta_end": ("beta_end", _ANY),
    "beta_schedule": ("beta_schedule", _ANY),
    "prediction_type": ("prediction_type", _ANY),
    "timestep_spacing": ("timestep_spacing", _ANY),
    "steps_offset": ("steps_offset", _ANY),
    "set_alpha_to_one": ("set_alpha_to_one", _ANY),
    "clip_sample": ("clip_sample", _ANY),
    "clip_sample_range": ("clip_sample_range", _ANY),
    "rescale_betas_zero_snr": ("rescale_betas_zero_snr", _ANY),
    "variance_type": ("variance_type", _ANY),
    "trained_betas": (None, None),
    "thresholding": (None, False),
    "dynamic_thresholding_ratio": (None, _ANY),  # only read when thresholding=True
    "sample_max_value": (None, _ANY),  # only read when thresholding=True
    "skip_prk_steps": (None, _ANY),  # PNDM's Runge-Kutta warm-up; we never run PNDM
    # Euler/DPM-solver sampling options: neutral values leave the training schedule untouched
    "use_karras_sigmas": (None, False),
    "use_exponential_sigmas": (None, False),
    "use_beta_sigmas": (None, False),
    "interpolation_type": (None, "linear"),
    "timestep_type": (None, "discrete"),
    "sigma_min": (None, None),
    "sigma_max": (None, None),
    "final_sigmas_type": (None, "zero"),
}

_FLOW_FIELDS: dict[str, tuple[str | None, Any]] = {
    "num_train_timesteps": ("num_train_timesteps", _ANY),
    "shift": ("shift", _ANY),
    "use_dynamic_shifting": ("use_dynamic_shifting", _ANY),
    "base_shift": ("base_shift", _ANY),
    "max_shift": ("max_shift", _ANY),
    "base_image_seq_len": ("base_image_seq_len", _ANY),
    "max_image_seq_len": ("max_image_seq_len", _ANY),
    "time_shift_type": ("time_shift_type", _ANY),
    "invert_sigmas": (None, False),
    "shift_terminal": (None, None),
    "use_karras_sigmas": (None, False),
    "use_exponential_sigmas": (None, False),
    "use_beta_sigmas": (None, False),
    "stochastic_sampling": (None, False),
}


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SchedulerConfigError(f"{field}={value!r} is not supported; choose one of {choices}")


def _parse_config(config: Mapping[str, Any], fields: dict[str, tuple[str | None, Any]], source: str) -> dict:
    kwargs = {}
    for key, value in config.items():
        if key.startswith("_"):  # _class_name, _diffusers_version, _use_default_values: bookkeeping only
            continue
        if key not in fields:
            raise SchedulerConfigError(
                f"{source}: unknown field {key!r}={value!r}; supported fields are {sorted(fields)}"
            )
        name, neutral = fields[key]
        if name is not None:
            kwargs[name] = value
        elif neutral is not _ANY and value != neutral:
            raise SchedulerConfigError(f"{source}: {key}={value!r} is not supported (only {neutral!r} is)")
    return kwargs


def load_scheduler_config(path: str | pathlib.Path) -> dict[str, Any]:
    """Read a scheduler config: a diffusers pipeline folder, its ``scheduler/`` folder, or the JSON file itself."""
    path = pathlib.Path(path)
    for candidate in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json", path):
        if candidate.is_file():
            try:
                config = json.loads(candidate.read_text())
            except json.JSONDecodeError as err:
                raise SchedulerConfigError(f"{candidate}: not valid JSON ({err})") from None
            if not isinstance(config, dict):
                raise SchedulerConfigError(f"{candidate}: expected a JSON object, got {type(config).__name__}")
            return config
    raise FileNotFoundError(f"no scheduler config at {path} (looked for scheduler/scheduler_config.json)")


def schedule_from_pretrained(path: str | pathlib.Path) -> NoiseSchedule | FlowMatchSchedule:
    """The schedule of a diffusers pipeline folder; flow-matching schedulers give a :class:`FlowMatchSchedule`."""
    config = load_scheduler_config(path)
    source = str(path)
    if "FlowMatch" in str(config.get("_class_name", "")):
        return FlowMatchSchedule.from_config(config, source=source)
    return NoiseSchedule.from_config(config, source=source)
