"""AutoencoderKL: parity with diffusers (torch, f32) on tiny random models, real-config parameter counts,
latent scaling/caching, config validation and checkpoint errors."""

import importlib.util
import json
import pathlib

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from metalora.models import convert, vae

REPO = pathlib.Path(__file__).resolve().parents[1]

TINY = {
    "2-block": dict(block_out_channels=[8, 16], layers_per_block=2),
    "3-block": dict(block_out_channels=[8, 16, 16], layers_per_block=1),
    "2-block-no-quant-no-attn": dict(block_out_channels=[8, 16], layers_per_block=1, use_quant_conv=False,
                                     use_post_quant_conv=False, mid_block_add_attention=False),
}


def _diffusers_vae(tmp_path: pathlib.Path, seed: int = 0, **overrides) -> tuple[diffusers.AutoencoderKL, pathlib.Path]:
    n = len(overrides["block_out_channels"])
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * n,
                                    up_block_types=["UpDecoderBlock2D"] * n, norm_num_groups=4, latent_channels=4,
                                    **overrides).eval()
    with torch.no_grad():  # move norms and biases off their 1/0 init so every parameter is exercised
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path / "vae"
    model.save_pretrained(folder)
    return model, folder


def _nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("name", list(TINY))
def test_encode_decode_match_diffusers(tmp_path, name):
    reference, folder = _diffusers_vae(tmp_path, **TINY[name])
    ours = vae.load_vae(folder)
    x = np.random.RandomState(0).uniform(-1, 1, (2, 3, 16, 12)).astype(np.float32)  # non-square on purpose
    with torch.no_grad():
        posterior = reference.encode(torch.tensor(x)).latent_dist
        z = np.random.RandomState(1).randn(*posterior.mean.shape).astype(np.float32)
        decoded = reference.decode(torch.tensor(z)).sample.numpy()
    with jax.default_matmul_precision("highest"):
        ours_posterior = vae.encode(ours, _nhwc(x))
        ours_decoded = vae.decode(ours, _nhwc(z))
    factor = 2 ** (len(TINY[name]["block_out_channels"]) - 1)
    assert ours_posterior.mean.shape == (2, 16 // factor, 12 // factor, 4)
    assert np.abs(_nchw(ours_posterior.mean) - posterior.mean.numpy()).max() <= 1e-4
    assert np.abs(_nchw(ours_posterior.logvar) - posterior.logvar.numpy()).max() <= 1e-4
    assert ours_decoded.shape == (2, 16, 12, 3)
    assert np.abs(_nchw(ours_decoded) - decoded).max() <= 1e-4


def test_posterior_sample_kl_and_clipping(tmp_path):
    moments = jnp.asarray(np.random.RandomState(0).randn(2, 4, 4, 8).astype(np.float32) * 3)
    moments = moments.at[0, 0, 0, 4].set(50.0).at[0, 0, 0, 5].set(-80.0)
    ours = vae.DiagonalGaussian.from_moments(moments)
    reference = diffusers.models.autoencoders.vae.DiagonalGaussianDistribution(torch.tensor(_nchw(moments)))
    np.testing.assert_allclose(_nchw(ours.logvar), reference.logvar.numpy())
    assert float(ours.logvar.max()) == 20.0 and float(ours.logvar.min()) == -30.0
    np.testing.assert_allclose(ours.kl(), reference.kl().numpy(), rtol=1e-5)
    key = jax.random.key(3)
    expected = ours.mean + jnp.exp(0.5 * ours.logvar) * jax.random.normal(key, ours.mean.shape)
    np.testing.assert_allclose(ours.sample(key), expected, rtol=1e-6)
    assert ours.mode() is ours.mean


def test_latent_scaling_conventions():
    base = vae.AutoencoderKLConfig(block_out_channels=(32,), scaling_factor=0.5)
    z = jnp.asarray(np.random.RandomState(0).randn(1, 2, 2, 4).astype(np.float32))
    np.testing.assert_allclose(vae.scale_latents(base, z), 0.5 * z)
    shifted = vae.AutoencoderKLConfig(block_out_channels=(32,), scaling_factor=0.5, shift_factor=0.1)
    np.testing.assert_allclose(vae.scale_latents(shifted, z), (z - 0.1) * 0.5, rtol=1e-6)
    stats = vae.AutoencoderKLConfig(block_out_channels=(32,), scaling_factor=0.5, latents_mean=(1, 2, 3, 4),
                                    latents_std=(2, 2, 4, 4))
    np.testing.assert_allclose(vae.scale_latents(stats, z), (z - jnp.arange(1, 5)) * 0.5 / jnp.asarray([2, 2, 4, 4]),
                               rtol=1e-6)
    for config in (base, shifted, stats):
        np.testing.assert_allclose(vae.unscale_latents(config, vae.scale_latents(config, z)), z, atol=1e-6)


def test_latent_cache(tmp_path):
    # Small graph (no attention, one resnet per block): this test compiles four programs.
    config = vae.AutoencoderKLConfig(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                     up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, scaling_factor=0.7,
                                     mid_block_add_attention=False)
    model = vae.vae_from_config(config, seed=1)
    images = np.random.RandomState(0).randint(0, 256, (5, 8, 8, 3)).astype(np.uint8)
    mean_latents = vae.latent_cache(model, images, batch_size=2)
    assert mean_latents.shape == (5, 4, 4, 4) and mean_latents.dtype == np.float32
    expected = 0.7 * np.asarray(vae.encode(model, images.astype(np.float32) / 127.5 - 1).mean)
    np.testing.assert_allclose(mean_latents, expected, atol=1e-5)
    key = jax.random.key(0)
    sampled = vae.latent_cache(model, images, key=key, batch_size=2)
    np.testing.assert_allclose(vae.latent_cache(model, images, key=key, batch_size=3), sampled, atol=1e-5)
    assert np.abs(sampled - mean_latents).max() > 1e-3  # it really sampled
    assert not np.allclose(vae.latent_cache(model, images, key=jax.random.key(1), batch_size=2), sampled)
    with pytest.raises(ValueError, match="multiple of"):
        vae.latent_cache(model, images[:, :7])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        vae.latent_cache(model, images.astype(np.float32))


def test_legacy_attention_names_and_bad_keys(tmp_path):
    _, folder = _diffusers_vae(tmp_path, **TINY["2-block"])
    tensors = convert.load_safetensors(folder, "diffusion_pytorch_model")
    legacy = {}
    for key, value in tensors.items():
        for new, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                         (".to_out.0.", ".proj_attn.")):
            key = key.replace(new, old)
        legacy[key] = value
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    save_file(legacy, str(folder / "diffusion_pytorch_model.safetensors"))
    ours = vae.load_vae(tmp_path)  # the pipeline folder (vae/ subfolder) works too
    np.testing.assert_array_equal(ours.decoder.mid_block.attentions[0].to_out[0].bias[...],
                                  tensors["decoder.mid_block.attentions.0.to_out.0.bias"])

    del tensors["decoder.up_blocks.1.resnets.2.conv2.bias"]
    tensors["encoder.conv_in.weight"] = np.zeros((8, 3, 5, 5), np.float32)
    tensors["encoder.down_blocks.0.downsamplers.0.extra"] = np.zeros((1,), np.float32)
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(convert.CheckpointMismatchError) as err:
        vae.load_vae(folder)
    message = str(err.value)
    for key in ("decoder.up_blocks.1.resnets.2.conv2.bias", "encoder.conv_in.weight",
                "encoder.down_blocks.0.downsamplers.0.extra"):
        assert key in message


@pytest.mark.parametrize(("field", "value"), [
    ("act_fn", "gelu"), ("down_block_types", ["DownBlock2D"]), ("norm_num_groups", 7), ("latents_std", [1.0] * 4),
    ("use_tiling", True), ("_class_name", "AutoencoderTiny"),
])
def test_unsupported_config_names_the_field(field, value):
    config = {"block_out_channels": [32], "down_block_types": ["DownEncoderBlock2D"],
              "up_block_types": ["UpDecoderBlock2D"], field: value}
    with pytest.raises(vae.UnsupportedConfigError, match=field):
        vae.AutoencoderKLConfig.from_dict(config)


def test_force_upcast_float16(tmp_path):
    _, folder = _diffusers_vae(tmp_path, **TINY["3-block"])
    config = json.loads((folder / "config.json").read_text())
    assert config["force_upcast"] is True
    ours = vae.load_vae(folder, dtype=jnp.float16, param_dtype=jnp.float16)
    assert ours.decoder.conv_in.dtype == jnp.float32 and ours.decoder.conv_in.kernel[...].dtype == jnp.float16
    (folder / "config.json").write_text(json.dumps(config | {"force_upcast": False}))
    assert vae.load_vae(folder, dtype=jnp.float16).decoder.conv_in.dtype == jnp.float16


def _sd_components():
    spec = importlib.util.spec_from_file_location("sd_components", REPO / "configs" / "sd_components.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["SD_VAE", "SDXL_VAE"])
def test_real_config_parameters_match_diffusers(name):
    raw = getattr(_sd_components(), name)
    with torch.device("meta"):
        reference = diffusers.AutoencoderKL.from_config(raw)
    theirs = {k: v.numel() for k, v in reference.state_dict().items()}
    model = nnx.eval_shape(lambda: vae.vae_from_config(raw))
    ours = {key: int(np.prod(getattr(module, attr).shape)) for key, module, attr, _ in
            convert.iter_torch_parameters(model)}
    assert ours == theirs
    assert sum(ours.values()) == 83_653_863
