"""UNet parity against diffusers (torch, f32), full-scale shapes, precision and loading errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from safetensors.numpy import save_file

from configs.sd_unets import UNETS
from metalora.models.convert import CheckpointMismatchError, export_torch_state
from metalora.models.loading import load_unet
from metalora.models.unet import UNet2DConditionModel, UNetConfig, UnsupportedConfigError, count_params

TINY_FAMILIES = {
    # SD-1.x: conv projections, one head count for every block.
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
                norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # SD-2.x: linear projections, per-block head counts, upcast attention, three levels, two layers per block.
    "sd2": dict(block_out_channels=(16, 32, 32), layers_per_block=2, cross_attention_dim=24,
                attention_head_dim=(2, 4, 4), norm_num_groups=8, use_linear_projection=True, upcast_attention=True,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # SDXL: text_time added conditioning, several transformer layers per block, attention-free first level.
    "sdxl": dict(block_out_channels=(16, 32, 64), layers_per_block=2, cross_attention_dim=32,
                 attention_head_dim=(2, 4, 8), norm_num_groups=8, use_linear_projection=True,
                 transformer_layers_per_block=(1, 2, 3), addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=20 + 6 * 8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    # Our tiny base: the prompt's hidden states also pooled into the time embedding (addition_embed_type="text").
    "base": dict(block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=24, attention_head_dim=4,
                 norm_num_groups=8, addition_embed_type="text", addition_embed_type_num_heads=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
}


def make_torch_unet(family: str, folder, seed: int = 0) -> TorchUNet:
    """A random diffusers UNet saved with ``save_pretrained``; weights perturbed so zero-init layers matter."""
    torch.manual_seed(seed)
    model = TorchUNet(**TINY_FAMILIES[family], sample_size=16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def make_inputs(family: str, batch: int = 2, size: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    cfg = TINY_FAMILIES[family]
    inputs = {
        "sample": rng.standard_normal((batch, 4, size, size), dtype=np.float32),
        "timesteps": np.array([3.0, 781.0][:batch], np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 7, cfg["cross_attention_dim"]), dtype=np.float32),
    }
    added = None
    if cfg.get("addition_embed_type") == "text_time":
        added = {"text_embeds": rng.standard_normal((batch, 20), dtype=np.float32),
                 "time_ids": np.tile(np.array([[16, 16, 0, 0, 16, 16]], np.float32), (batch, 1))}
    return inputs, added


def torch_forward(model, inputs, added):
    torch_added = {k: torch.from_numpy(v) for k, v in added.items()} if added else None
    with torch.no_grad():
        out = model(torch.from_numpy(inputs["sample"]), torch.from_numpy(inputs["timesteps"]),
                    torch.from_numpy(inputs["encoder_hidden_states"]), added_cond_kwargs=torch_added).sample
    return out.numpy()


def jax_forward(model, inputs, added):
    out = model(jnp.asarray(inputs["sample"].transpose(0, 2, 3, 1)), jnp.asarray(inputs["timesteps"]),
                jnp.asarray(inputs["encoder_hidden_states"]), added_cond_kwargs=added)
    return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_parity_with_diffusers(family, tmp_path):
    torch_model = make_torch_unet(family, tmp_path)
    inputs, added = make_inputs(family)
    expected = torch_forward(torch_model, inputs, added)
    # Every backend on the smallest family; the default (blocked on CPU) on all of them.
    backends = ("blocked", "einsum", "xla") if family == "sd1" else ("auto",)
    for backend in backends:
        ours = jax_forward(load_unet(tmp_path, attention_backend=backend), inputs, added)
        np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0, err_msg=f"backend={backend}")


def test_odd_spatial_size_matches_diffusers(tmp_path):
    """Sizes not divisible by 2**levels take diffusers' explicit upsample-size path."""
    torch_model = make_torch_unet("sd2", tmp_path)
    inputs, added = make_inputs("sd2", size=10)
    expected = torch_forward(torch_model, inputs, added)
    np.testing.assert_allclose(jax_forward(load_unet(tmp_path), inputs, added), expected, atol=1e-4, rtol=0)


def test_export_round_trips_to_the_torch_state_dict(tmp_path):
    torch_model = make_torch_unet("sdxl", tmp_path)
    exported = export_torch_state(load_unet(tmp_path))
    reference = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    assert exported.keys() == reference.keys()
    for key, value in reference.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


# SDXL's count traces the abstract 2.6 B-parameter UNet (~140 s on 2 cores): in the slow suite.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "sdxl" else n for n in sorted(UNETS)])
def test_published_configs_have_diffusers_parameter_counts(name):
    with torch.device("meta"):
        reference = sum(p.numel() for p in TorchUNet(**UNETS[name]).parameters())
    config = UNetConfig.from_diffusers(UNETS[name])
    abstract = nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0)))
    assert count_params(abstract) == reference
    if name == "sd15":
        assert reference == 859_520_964


def test_bf16_compute_stays_close_to_f32(tmp_path):
    """bf16 activations (f32 params, f32 softmax statistics): documented tolerance 3% of the output scale."""
    torch_model = make_torch_unet("sd1", tmp_path)
    inputs, added = make_inputs("sd1")
    expected = torch_forward(torch_model, inputs, added)
    out = jax_forward(load_unet(tmp_path, dtype=jnp.bfloat16), inputs, added)
    assert np.isfinite(out).all()
    assert np.abs(out.astype(np.float32) - expected).max() <= 0.03 * np.abs(expected).max()


def test_remat_gives_identical_gradients(tmp_path):
    make_torch_unet("sd1", tmp_path)
    inputs, _ = make_inputs("sd1")
    args = (jnp.asarray(inputs["sample"].transpose(0, 2, 3, 1)), jnp.asarray(inputs["timesteps"]),
            jnp.asarray(inputs["encoder_hidden_states"]))

    def grads(remat):
        graphdef, params = nnx.split(load_unet(tmp_path, remat=remat))
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(*args) ** 2)
        return jax.grad(loss)(params)

    for a, b in zip(jax.tree_util.tree_leaves(grads(False)), jax.tree_util.tree_leaves(grads(True)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_sharded_safetensors_index_loads(tmp_path):
    torch_model = make_torch_unet("sd1", tmp_path / "single")
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    keys = sorted(state)
    shards = {"part-00001.safetensors": keys[: len(keys) // 2], "part-00002.safetensors": keys[len(keys) // 2:]}
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(folder / name))
    index = {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    inputs, added = make_inputs("sd1")
    np.testing.assert_array_equal(jax_forward(load_unet(folder), inputs, added),
                                  jax_forward(load_unet(tmp_path / "single"), inputs, added))


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
    torch_model = make_torch_unet("sd1", tmp_path)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    del state["conv_in.bias"]
    state["extra.weight"] = np.zeros(3, np.float32)
    state["conv_out.weight"] = np.zeros((4, 32, 1, 1), np.float32)
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as err:
        load_unet(tmp_path)
    message = str(err.value)
    assert "1 missing" in message and "conv_in.bias" in message
    assert "1 unexpected" in message and "extra.weight" in message
    assert "conv_out.weight" in message and "(4, 32, 1, 1)" in message and "(3, 3, 32, 4)" in message


def test_pickle_checkpoints_are_refused(tmp_path):
    make_torch_unet("sd1", tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").rename(tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        load_unet(tmp_path)


@pytest.mark.parametrize("field, value", [("resnet_time_scale_shift", "scale_shift"), ("class_embed_type", "timestep"),
                                          ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
                                          ("brand_new_field", 1)])
def test_unsupported_config_names_the_field(field, value):
    config = {**TINY_FAMILIES["sd1"], field: value}
    with pytest.raises(UnsupportedConfigError, match=field):
        UNetConfig.from_diffusers(config)


@pytest.mark.parametrize("shape,groups", [((2, 8, 8, 32), 8), ((3, 5, 16), 4), ((2, 4, 4, 6, 12), 3)])
def test_channels_last_group_norm_equals_flax_group_norm(shape, groups):
    """The UNet's GroupNorm (reductions reordered for XLA:CPU) = nnx.GroupNorm's two-pass math, values and grads."""
    from metalora.models.unet_blocks import ChannelsLastGroupNorm

    kwargs = dict(num_groups=groups, epsilon=1e-5, use_fast_variance=False, rngs=nnx.Rngs(0))
    ref, ours = nnx.GroupNorm(shape[-1], **kwargs), ChannelsLastGroupNorm(shape[-1], **kwargs)
    for module in (ref, ours):
        module.scale.value = jax.random.normal(jax.random.key(1), (shape[-1],))
        module.bias.value = jax.random.normal(jax.random.key(2), (shape[-1],))
    x = 5.0 * jax.random.normal(jax.random.key(0), shape) + 3.0
    np.testing.assert_allclose(ours(x), ref(x), atol=5e-6)

    def grads(module):
        graphdef, state = nnx.split(module)
        return jax.grad(lambda s, x: jnp.sum(jnp.sin(nnx.merge(graphdef, s)(x))), argnums=(0, 1))(state, x)

    for a, b in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(ref))):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)
