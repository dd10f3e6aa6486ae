"""CLIP text encoders: parity with transformers (torch, f32) on tiny random models, real-config parameter
counts, config validation and checkpoint errors."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import save_file

from metalora.models import clip, convert

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB, BOS, EOS = 50, 44, 45  # EOS is not the largest id, so the two pooling rules can differ


def _sd_components():
    spec = importlib.util.spec_from_file_location("sd_components", REPO / "configs" / "sd_components.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_hf_config(eos_token_id: int, hidden_act: str = "quick_gelu") -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=24, hidden_act=hidden_act, bos_token_id=BOS,
        eos_token_id=eos_token_id, pad_token_id=1)


def _ids() -> np.ndarray:
    """Sequences where the two pooling rules disagree: the highest id (46, 47) is not at the first EOS.

    Row 0 ends early and is padded with EOS; row 1 has EOS mid-sequence; row 2 has its only EOS at the end.
    """
    rng = np.random.RandomState(0)
    ids = rng.randint(3, 40, size=(3, 12))
    ids[:, 0] = 5  # not BOS on purpose: the largest id must sit away from EOS for the legacy rule to differ
    ids[0, 2], ids[0, 6:] = 47, EOS
    ids[1, 9], ids[1, 4] = 47, EOS
    ids[2, 11], ids[2, 1] = EOS, 46
    return ids


def _save(model: torch.nn.Module, tmp_path: pathlib.Path, name: str) -> pathlib.Path:
    folder = tmp_path / name
    model.save_pretrained(folder)
    return folder


def _torch_outputs(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long), output_hidden_states=True)


def _max_err(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs.detach().numpy().astype(np.float64))))


@pytest.mark.parametrize("eos_token_id", [2, EOS], ids=["legacy-eos-2", "eos-id"])
@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_clip_text_model_matches_transformers(tmp_path, eos_token_id, hidden_act):
    torch.manual_seed(0)
    reference = transformers.CLIPTextModel(_tiny_hf_config(eos_token_id, hidden_act)).eval()
    ours = clip.load_clip_text_model(_save(reference, tmp_path, "te"))
    assert isinstance(ours, clip.CLIPTextModel)
    ids = _ids()
    theirs = _torch_outputs(reference, ids)
    with jax.default_matmul_precision("highest"):
        out = clip.encode_text(ours, ids)
    assert len(out.hidden_states) == len(theirs.hidden_states) == 4
    assert _max_err(out.last_hidden_state, theirs.last_hidden_state) <= 1e-4
    assert _max_err(out.hidden_states[-2], theirs.hidden_states[-2]) <= 1e-4  # SD-2.x / SDXL penultimate layer
    assert _max_err(out.hidden_states[0], theirs.hidden_states[0]) <= 1e-4
    assert _max_err(out.pooled_output, theirs.pooler_output) <= 1e-4
    # The test ids make the two pooling rules pick different tokens, so this checks the rule, not luck.
    legacy_index = ids.argmax(-1)
    eos_index = (ids == EOS).argmax(-1)
    assert not np.array_equal(legacy_index, eos_index)
    expected_index = legacy_index if eos_token_id == 2 else eos_index
    np.testing.assert_allclose(out.pooled_output, out.last_hidden_state[np.arange(3), expected_index], atol=0)


def test_clip_text_model_with_projection_matches_transformers(tmp_path):
    torch.manual_seed(1)
    reference = transformers.CLIPTextModelWithProjection(_tiny_hf_config(EOS, "gelu")).eval()
    ours = clip.load_clip_text_model(_save(reference, tmp_path, "te2"))
    assert isinstance(ours, clip.CLIPTextModelWithProjection)
    ids = _ids()
    theirs = _torch_outputs(reference, ids)
    with jax.default_matmul_precision("highest"):
        out = clip.encode_text(ours, ids)
    assert out.text_embeds.shape == (3, 24)
    assert _max_err(out.text_embeds, theirs.text_embeds) <= 1e-4
    assert _max_err(out.last_hidden_state, theirs.last_hidden_state) <= 1e-4
    assert _max_err(out.hidden_states[-2], theirs.hidden_states[-2]) <= 1e-4


def test_padding_attention_mask_matches_transformers(tmp_path):
    torch.manual_seed(2)
    reference = transformers.CLIPTextModel(_tiny_hf_config(EOS)).eval()
    ours = clip.load_clip_text_model(_save(reference, tmp_path, "te"))
    ids = _ids()
    mask = (np.arange(12)[None] <= (ids == EOS).argmax(-1)[:, None]).astype(np.int32)
    with torch.no_grad():
        theirs = reference(torch.tensor(ids), attention_mask=torch.tensor(mask))
    with jax.default_matmul_precision("highest"):
        out = ours(jnp.asarray(ids), jnp.asarray(mask))
    # Positions up to the first EOS are what a padding mask is for; compare those.
    valid = mask.astype(bool)
    diff = np.abs(np.asarray(out.last_hidden_state) - theirs.last_hidden_state.numpy())[valid]
    assert diff.max() <= 1e-4
    unmasked = ours(jnp.asarray(ids))
    assert not np.allclose(np.asarray(unmasked.last_hidden_state)[~valid], np.asarray(out.last_hidden_state)[~valid])
    assert np.abs(np.asarray(unmasked.last_hidden_state) - np.asarray(out.last_hidden_state))[valid].max() <= 1e-5, \
        "causal attention never looks past the first EOS, so a right-padding mask changes nothing before it"


def test_loads_transformers4_layout_and_sharded_checkpoint(tmp_path):
    """SD checkpoints (transformers 4) prefix keys with 'text_model.' and may carry position_ids or shards."""
    torch.manual_seed(3)
    reference = transformers.CLIPTextModel(_tiny_hf_config(EOS)).eval()
    folder = _save(reference, tmp_path, "te")
    tensors = convert.load_safetensors(folder, "model")
    assert not any(k.startswith("text_model.") for k in tensors), "transformers 5 writes the unprefixed layout"
    legacy = {f"text_model.{k}": v for k, v in tensors.items()}
    legacy["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    keys = sorted(legacy)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for shard, names in shards.items():
        save_file({k: legacy[k] for k in names}, str(folder / shard))
    (folder / "model.safetensors").unlink()
    weight_map = {k: shard for shard, names in shards.items() for k in names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ours = clip.load_clip_text_model(folder)
    ids = _ids()
    with jax.default_matmul_precision("highest"):
        out = clip.encode_text(ours, ids)
    assert _max_err(out.last_hidden_state, _torch_outputs(reference, ids).last_hidden_state) <= 1e-4


def test_bad_checkpoint_lists_every_problem(tmp_path):
    torch.manual_seed(4)
    folder = _save(transformers.CLIPTextModel(_tiny_hf_config(EOS)).eval(), tmp_path, "te")
    tensors = convert.load_safetensors(folder, "model")
    del tensors["encoder.layers.1.mlp.fc2.bias"]
    tensors["encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 31), np.float32)
    tensors["encoder.layers.0.extra.weight"] = np.zeros((2,), np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(convert.CheckpointMismatchError) as err:
        clip.load_clip_text_model(folder)
    message = str(err.value)
    assert "text_model.encoder.layers.1.mlp.fc2.bias" in message
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in message and "(32, 31)" in message
    assert "text_model.encoder.layers.0.extra.weight" in message


def test_pickle_checkpoint_is_refused(tmp_path):
    folder = tmp_path / "te"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(clip.small_clip_config(10, 8).to_dict()))
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        clip.load_clip_text_model(folder)
    (folder / "model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        clip.load_clip_text_model(folder)


@pytest.mark.parametrize(("field", "value"), [("hidden_act", "relu"), ("attention_dropout", 0.1),
                                              ("num_attention_heads", 5), ("model_type", "clip")])
def test_unsupported_config_names_the_field(field, value):
    config = _sd_components().SD15_TEXT_ENCODER | {field: value}
    with pytest.raises(clip.UnsupportedConfigError, match=field):
        clip.CLIPTextConfig.from_dict(config)


def test_config_round_trip_and_generic_keys_ignored():
    config = clip.CLIPTextConfig.from_dict(_sd_components().SD15_TEXT_ENCODER | {"output_attentions": False})
    assert config.hidden_size == 768 and config.eos_token_id == 2
    assert clip.CLIPTextConfig.from_dict(config.to_dict()) == config


def _torch_param_shapes(model: torch.nn.Module, prefix: str = "") -> dict[str, int]:
    return {prefix + k: v.numel() for k, v in model.state_dict().items()}


def _our_param_sizes(model: nnx.Module) -> dict[str, int]:
    return {key: int(np.prod(getattr(module, attr).shape))
            for key, module, attr, _ in convert.iter_torch_parameters(model)}


@pytest.mark.parametrize(("name", "torch_cls", "ours_cls", "expected"), [
    ("SD15_TEXT_ENCODER", transformers.CLIPTextModel, clip.CLIPTextModel, 123_060_480),
    ("SDXL_TEXT_ENCODER_2", transformers.CLIPTextModelWithProjection, clip.CLIPTextModelWithProjection, 694_659_840),
])
def test_real_config_parameters_match_transformers(name, torch_cls, ours_cls, expected):
    raw = getattr(_sd_components(), name)
    with torch.device("meta"):
        reference = torch_cls(transformers.CLIPTextConfig(**raw))
    theirs = _torch_param_shapes(reference, "" if torch_cls is transformers.CLIPTextModelWithProjection
                                 else "text_model.")
    ours_model = nnx.eval_shape(lambda: ours_cls(clip.CLIPTextConfig.from_dict(raw), rngs=nnx.Rngs(0)))
    ours = _our_param_sizes(ours_model)
    assert ours == theirs  # same names, same sizes
    assert clip.count_params(ours_model) == sum(theirs.values()) == expected


def test_small_config_and_dtypes():
    config = clip.small_clip_config(vocab_size=40, max_length=24)
    model = clip.CLIPTextModel(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert model.text_model.encoder.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.float32
    ids = np.full((2, 24), config.eos_token_id, np.int32)
    ids[:, 0], ids[0, 1:4], ids[1, 1:6] = config.bos_token_id, 7, 9
    out = clip.encode_text(model, ids)
    assert out.last_hidden_state.dtype == jnp.bfloat16 and out.last_hidden_state.shape == (2, 24, 128)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert bool(jnp.all(jnp.isfinite(out.last_hidden_state.astype(jnp.float32))))
    full = clip.encode_text(clip.CLIPTextModel(config, rngs=nnx.Rngs(0)), ids)
    np.testing.assert_allclose(np.asarray(out.pooled_output, np.float32), full.pooled_output, atol=0.1)
    assert 100_000 < clip.count_params(model) < 1_000_000
    with pytest.raises(clip.UnsupportedConfigError, match="eos_token_id"):
        clip.small_clip_config(40, 24, eos_token_id=2)


def test_small_encoder_trains_through_jit_grad():
    """The small-world encoder is trained with the UNet: gradients must flow to every parameter."""
    config = clip.small_clip_config(vocab_size=20, max_length=8, hidden_size=64, num_hidden_layers=2)
    model = clip.CLIPTextModelWithProjection(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    ids = jnp.asarray([[0, 5, 6, 1, 1, 1, 1, 1], [0, 7, 8, 9, 1, 1, 1, 1]], jnp.int32)

    @jax.jit
    def loss_fn(params):
        out = nnx.merge(graphdef, params)(ids)
        return jnp.mean(out.text_embeds**2) + jnp.mean(out.last_hidden_state**2)

    grads = jax.grad(loss_fn)(params)
    norms = jax.tree.map(lambda g: float(jnp.linalg.norm(g)), grads)
    zero = [path for path, n in jax.tree_util.tree_leaves_with_path(norms) if n == 0.0]
    assert not zero, f"parameters with zero gradient: {zero}"
