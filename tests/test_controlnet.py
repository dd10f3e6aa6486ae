"""ControlNet parity against diffusers (torch, f32), UNet + ControlNet residuals, initialisation and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from metalora.models.controlnet import (
    ControlNetConfig,
    ControlNetModel,
    controlnet_config_from_unet,
    controlnet_from_unet,
)
from metalora.models.convert import export_torch_state
from metalora.models.loading import load_controlnet, load_unet
from metalora.models.unet import (
    UNet2DConditionModel,
    UNetConfig,
    UnsupportedConfigError,
    count_params,
    down_residual_channels,
)

TINY_CONTROLNETS = {
    # SD-1.x: conv projections; a two-level conditioning stack, so the image is 2× the latent.
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16, attention_head_dim=(2, 4),
                norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                conditioning_embedding_out_channels=(8, 16)),
    # SD-1.x layout with a BGR-trained conditioning stack and spatially pooled residuals (diffusers' "shuffle" nets).
    "sd1_bgr_pooled": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16,
                           attention_head_dim=4, norm_num_groups=8,
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           conditioning_embedding_out_channels=(8, 16), controlnet_conditioning_channel_order="bgr",
                           global_pool_conditions=True),
    # SDXL: text_time added conditioning, linear projections, two transformer layers, attention-free first level,
    # a three-level conditioning stack (image 4× the latent).
    "sdxl": dict(block_out_channels=(16, 32), layers_per_block=2, cross_attention_dim=24, attention_head_dim=(2, 4),
                 norm_num_groups=8, use_linear_projection=True, transformer_layers_per_block=(1, 2),
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=20 + 6 * 8, down_block_types=("DownBlock2D",
                                                                                     "CrossAttnDownBlock2D"),
                 conditioning_embedding_out_channels=(8, 8, 16)),
}
# The UNet the end-to-end test pairs with a ControlNet made from it by diffusers' ``from_unet``.
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16, attention_head_dim=4,
                 norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=16)


def _perturb(model: torch.nn.Module) -> None:
    """Adds noise to every weight: the zero convs must be non-zero or the residual parity would be trivial."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def make_torch_controlnet(family: str, folder, seed: int = 0) -> TorchControlNet:
    torch.manual_seed(seed)
    model = TorchControlNet(**TINY_CONTROLNETS[family]).eval()
    _perturb(model)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def make_inputs(cross_attention_dim: int, *, size: int, cond_size: int, text_time: bool, batch: int = 2,
                seed: int = 0):
    """NCHW numpy inputs (the torch twin's layout); ``nhwc`` converts them for our models."""
    rng = np.random.default_rng(seed)
    inputs = {
        "sample": rng.standard_normal((batch, 4, size, size), dtype=np.float32),
        "timesteps": np.array([3.0, 781.0][:batch], np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 7, cross_attention_dim), dtype=np.float32),
        "controlnet_cond": rng.uniform(0, 1, (batch, 3, cond_size, cond_size)).astype(np.float32),
    }
    added = None
    if text_time:
        added = {"text_embeds": rng.standard_normal((batch, 20), dtype=np.float32),
                 "time_ids": np.tile(np.array([[16, 16, 0, 0, 16, 16]], np.float32), (batch, 1))}
    return inputs, added


def nhwc(x: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def to_nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def family_inputs(family: str, size: int = 16):
    cfg = TINY_CONTROLNETS[family]
    factor = 2 ** (len(cfg["conditioning_embedding_out_channels"]) - 1)
    return make_inputs(cfg["cross_attention_dim"], size=size, cond_size=size * factor,
                       text_time=cfg.get("addition_embed_type") == "text_time")


def torch_controlnet_forward(model, inputs, added, **kwargs):
    torch_added = {k: torch.from_numpy(v) for k, v in added.items()} if added else None
    with torch.no_grad():
        out = model(torch.from_numpy(inputs["sample"]), torch.from_numpy(inputs["timesteps"]),
                    torch.from_numpy(inputs["encoder_hidden_states"]), torch.from_numpy(inputs["controlnet_cond"]),
                    added_cond_kwargs=torch_added, return_dict=False, **kwargs)
    down, mid = out
    return [d.numpy() for d in down], mid.numpy()


def jax_controlnet_forward(model, inputs, added, **kwargs):
    down, mid = model(nhwc(inputs["sample"]), jnp.asarray(inputs["timesteps"]),
                      jnp.asarray(inputs["encoder_hidden_states"]), nhwc(inputs["controlnet_cond"]),
                      added_cond_kwargs=added, **kwargs)
    return [to_nchw(d) for d in down], to_nchw(mid)


def max_error(ours, expected) -> float:
    (down, mid), (down_ref, mid_ref) = ours, expected
    assert len(down) == len(down_ref)
    for a, b in zip(down, down_ref, strict=True):
        assert a.shape == b.shape
    assert mid.shape == mid_ref.shape
    return max(float(np.abs(a - b).max()) for a, b in zip([*down, mid], [*down_ref, mid_ref], strict=True))


@pytest.mark.parametrize("family", sorted(TINY_CONTROLNETS))
def test_controlnet_parity_with_diffusers(family, tmp_path):
    torch_model = make_torch_controlnet(family, tmp_path)
    inputs, added = family_inputs(family)
    ours = load_controlnet(tmp_path)
    expected = torch_controlnet_forward(torch_model, inputs, added, conditioning_scale=0.7)
    # The residuals must be far from zero for the comparison to mean anything.
    assert min(float(np.abs(r).max()) for r in [*expected[0], expected[1]]) > 1e-3
    assert max_error(jax_controlnet_forward(ours, inputs, added, conditioning_scale=0.7), expected) < 1e-4
    if family == "sd1":  # guess mode's geometric scales
        expected = torch_controlnet_forward(torch_model, inputs, added, guess_mode=True)
        assert max_error(jax_controlnet_forward(ours, inputs, added, guess_mode=True), expected) < 1e-4


def test_controlnet_export_round_trips_to_the_torch_state_dict(tmp_path):
    torch_model = make_torch_controlnet("sdxl", tmp_path)
    exported = export_torch_state(load_controlnet(tmp_path))
    reference = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    assert exported.keys() == reference.keys()
    for key, value in reference.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_published_controlnet_config_has_diffusers_parameter_count():
    """SD-1.5 ControlNets (lllyasviel/sd-controlnet-*): diffusers' defaults with a 768-wide text encoder."""
    config = {"cross_attention_dim": 768}
    with torch.device("meta"):
        reference = sum(p.numel() for p in TorchControlNet(**config).parameters())
    ours = nnx.eval_shape(lambda: ControlNetModel(ControlNetConfig.from_diffusers(config), rngs=nnx.Rngs(0)))
    assert count_params(ours) == reference


def test_unet_with_controlnet_residuals_matches_diffusers(tmp_path):
    """diffusers' from_unet ControlNet (perturbed) → its residuals → the UNet, against ours loaded from the files."""
    torch.manual_seed(0)
    torch_unet = TorchUNet(**TINY_UNET).eval()
    _perturb(torch_unet)
    torch_controlnet = TorchControlNet.from_unet(torch_unet, conditioning_embedding_out_channels=(8, 16)).eval()
    _perturb(torch_controlnet)
    torch_unet.save_pretrained(tmp_path / "unet")
    torch_controlnet.save_pretrained(tmp_path / "controlnet")  # a pipeline-shaped folder: load by subfolder
    inputs, _ = make_inputs(16, size=16, cond_size=32, text_time=False)
    down_ref, mid_ref = torch_controlnet_forward(torch_controlnet, inputs, None)
    with torch.no_grad():
        expected = torch_unet(torch.from_numpy(inputs["sample"]), torch.from_numpy(inputs["timesteps"]),
                              torch.from_numpy(inputs["encoder_hidden_states"]),
                              down_block_additional_residuals=[torch.from_numpy(d) for d in down_ref],
                              mid_block_additional_residual=torch.from_numpy(mid_ref)).sample.numpy()

    unet, controlnet = load_unet(tmp_path), load_controlnet(tmp_path)
    down, mid = controlnet(nhwc(inputs["sample"]), jnp.asarray(inputs["timesteps"]),
                           jnp.asarray(inputs["encoder_hidden_states"]), nhwc(inputs["controlnet_cond"]))
    args = (nhwc(inputs["sample"]), jnp.asarray(inputs["timesteps"]), jnp.asarray(inputs["encoder_hidden_states"]))
    # The UNet alone with diffusers' residuals, then the whole chain with ours.
    alone = unet(*args, down_block_additional_residuals=[nhwc(d) for d in down_ref],
                 mid_block_additional_residual=nhwc(mid_ref))
    chained = unet(*args, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    without = to_nchw(unet(*args))
    assert np.abs(without - expected).max() > 1e-2  # the residuals do change the output
    np.testing.assert_allclose(to_nchw(alone), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(to_nchw(chained), expected, atol=1e-4, rtol=0)


def test_controlnet_from_unet_copies_the_encoder_like_diffusers(tmp_path):
    torch.manual_seed(0)
    torch_unet = TorchUNet(**TINY_UNET).eval()
    _perturb(torch_unet)
    torch_unet.save_pretrained(tmp_path)
    torch_controlnet = TorchControlNet.from_unet(torch_unet, conditioning_embedding_out_channels=(8, 16))
    reference = torch_controlnet.state_dict()

    controlnet = controlnet_from_unet(load_unet(tmp_path), conditioning_embedding_out_channels=(8, 16))
    assert controlnet.config == ControlNetConfig.from_diffusers(dict(torch_controlnet.config))
    exported = export_torch_state(controlnet)
    assert exported.keys() == reference.keys()
    for key, value in reference.items():
        if key.startswith("controlnet_cond_embedding.") and not key.startswith("controlnet_cond_embedding.conv_out"):
            continue  # random in both
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)


def test_controlnet_from_sdxl_unet_copies_the_added_embedding():
    """SDXL: the text_time embedding is part of the encoder that is copied (weights and config)."""
    sdxl = {k: v for k, v in TINY_CONTROLNETS["sdxl"].items() if k != "conditioning_embedding_out_channels"}
    up = tuple({"DownBlock2D": "UpBlock2D"}.get(t, "CrossAttnUpBlock2D") for t in sdxl["down_block_types"][::-1])
    unet = UNet2DConditionModel(UNetConfig.from_diffusers({**sdxl, "up_block_types": up}), rngs=nnx.Rngs(3))
    controlnet = controlnet_from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    assert controlnet.config.addition_embed_type == "text_time"
    for name in ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block"):
        ours, theirs = nnx.state(getattr(controlnet, name)), nnx.state(getattr(unet, name))
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_fresh_controlnet_leaves_the_unet_unchanged(tmp_path):
    torch.manual_seed(0)
    torch_unet = TorchUNet(**TINY_UNET).eval()
    _perturb(torch_unet)
    torch_unet.save_pretrained(tmp_path)
    unet = load_unet(tmp_path)
    inputs, _ = make_inputs(16, size=16, cond_size=32, text_time=False)
    args = (nhwc(inputs["sample"]), jnp.asarray(inputs["timesteps"]), jnp.asarray(inputs["encoder_hidden_states"]))
    fresh = ControlNetModel(controlnet_config_from_unet(unet.config, conditioning_embedding_out_channels=(8, 16)),
                            rngs=nnx.Rngs(1))
    for controlnet in (fresh, controlnet_from_unet(unet, conditioning_embedding_out_channels=(8, 16))):
        down, mid = controlnet(*args, nhwc(inputs["controlnet_cond"]))
        assert [d.shape[-1] for d in down] == list(down_residual_channels(unet.config))
        assert all(not np.any(np.asarray(r)) for r in [*down, mid])
        np.testing.assert_array_equal(
            np.asarray(unet(*args, down_block_additional_residuals=down, mid_block_additional_residual=mid)),
            np.asarray(unet(*args)))


def test_wrong_residuals_are_refused():
    unet = UNet2DConditionModel(UNetConfig.from_diffusers(TINY_UNET), rngs=nnx.Rngs(0))
    controlnet = controlnet_from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    inputs, _ = make_inputs(16, size=8, cond_size=16, text_time=False, batch=1)
    args = (nhwc(inputs["sample"]), jnp.asarray(inputs["timesteps"]), jnp.asarray(inputs["encoder_hidden_states"]))
    down, mid = controlnet(*args, nhwc(inputs["controlnet_cond"]))
    with pytest.raises(ValueError, match=r"3 entries.*4 skip connections"):
        unet(*args, down_block_additional_residuals=down[:-1], mid_block_additional_residual=mid)
    with pytest.raises(ValueError, match="both"):
        unet(*args, down_block_additional_residuals=down)
    with pytest.raises(ValueError, match="2× the sample"):
        controlnet(*args, nhwc(inputs["controlnet_cond"])[:, :8, :8])


@pytest.mark.parametrize("field, value", [("resnet_time_scale_shift", "scale_shift"), ("class_embed_type", "timestep"),
                                          ("controlnet_conditioning_channel_order", "yuv"),
                                          ("mid_block_type", "UNetMidBlock2D"), ("layers_per_block", [1, 2]),
                                          ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
                                          ("brand_new_field", 1)])
def test_unsupported_controlnet_config_names_the_field(field, value):
    config = {**TINY_CONTROLNETS["sd1"], field: value}
    with pytest.raises(UnsupportedConfigError, match=field):
        ControlNetConfig.from_diffusers(config)


def test_controlnet_config_round_trips_through_diffusers():
    config = ControlNetConfig.from_diffusers(TINY_CONTROLNETS["sdxl"])
    assert ControlNetConfig.from_diffusers(config.to_diffusers()) == config
    torch_config = TorchControlNet(**config.to_diffusers()).config
    assert ControlNetConfig.from_diffusers(dict(torch_config)) == config
