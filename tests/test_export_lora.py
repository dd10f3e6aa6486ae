"""LoRA files: export that diffusers loads (real client), PEFT/kohya import, key errors."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from metalora import export, lora
from metalora.lora import LoRAConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=8, sample_size=16, in_channels=4, out_channels=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


# ---------------------------------------------------------------------------------------- a tiny real UNet pair
@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory) -> pathlib.Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "unet"
    diffusers.UNet2DConditionModel(**TINY_UNET).save_pretrained(folder)
    return folder


def torch_unet(folder):
    return diffusers.UNet2DConditionModel.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((2, 4, 16, 16)).astype(np.float32), np.array([10.0, 500.0], np.float32),
            rng.standard_normal((2, 7, 32)).astype(np.float32))


def run_torch(unet, inputs):
    with torch.no_grad():
        return unet(*(torch.from_numpy(a) for a in inputs)).sample.numpy()


@jax.jit(static_argnums=0)
def _run(graphdef, state, sample, t, context):
    return nnx.merge(graphdef, state)(sample, t, context)


def run_ours(model, inputs):
    x, t, c = inputs
    return np.asarray(_run(*nnx.split(model), x.transpose(0, 2, 3, 1), t, c)).transpose(0, 3, 1, 2)


def randomize_heads(model, key, scale=0.2):
    heads = nnx.state(model, lora.SubjectParam)
    leaves, treedef = jax.tree.flatten(heads)
    nnx.update(model, jax.tree.unflatten(treedef, [scale * jax.random.normal(jax.random.fold_in(key, i), x.shape)
                                                   for i, x in enumerate(leaves)]))


# ------------------------------------------------------------------------------------------ real-client trips
def test_export_loads_in_diffusers_and_matches(unet_folder, inputs, tmp_path):
    """Meta-LoRA (3 factors, convs included) → pytorch_lora_weights.safetensors → diffusers' own LoRA loader."""
    from metalora.models.loading import load_unet

    model = load_unet(unet_folder)
    cfg = LoRAConfig(targets="all_linear_conv", rank=4, mid_rank=3, alpha=2.0, down_role="meta", num_subjects=2)
    paths = lora.inject(model, cfg, key=jax.random.key(0))
    assert any("resnets.0.conv1" in p for p in paths) and any("attn2.to_k" in p for p in paths)
    randomize_heads(model, jax.random.key(1))
    weights = export.export_diffusers(model, 1, tmp_path / "lora")
    assert weights.name == "pytorch_lora_weights.safetensors"
    assert not [p for p in (tmp_path / "lora").iterdir() if p.name.startswith(".")]  # atomic: no temp leftovers

    with safe_open(str(weights), framework="numpy") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        a = f.get_tensor("unet.down_blocks.0.resnets.0.conv1.lora_A.weight")
        b = f.get_tensor("unet.down_blocks.0.resnets.0.conv1.lora_B.weight")
    assert meta["unet.r"] == meta["unet.lora_alpha"] == 4  # alpha == r_d: diffusers applies scale 1
    assert a.shape == (4, 32, 3, 3) and b.shape == (32, 4, 1, 1)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["metalora"]["mid_rank"] == 3

    theirs = torch_unet(unet_folder)
    base = run_torch(theirs, inputs)
    theirs.load_lora_adapter(str(tmp_path / "lora"), weight_name=weights.name, prefix="unet")
    adapted = run_torch(theirs, inputs)
    ours = run_ours(lora.take_subject(model, 1), inputs)
    assert np.abs(adapted - base).max() > 0.05  # the adapter is not a no-op
    assert np.abs(ours - adapted).max() <= 1e-4

    # kohya: same subject through kohya's key format and diffusers' kohya converter gives the same UNet
    kohya = export.export_kohya(model, 1, tmp_path / "kohya.safetensors")
    keys = load_file(str(kohya))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= set(keys)
    assert float(keys[f"{name}.alpha"]) == 4.0
    state_dict, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(kohya))[:2]
    via_kohya = torch_unet(unet_folder)
    via_kohya.load_lora_adapter(state_dict, network_alphas=alphas, prefix="unet")
    assert np.abs(run_torch(via_kohya, inputs) - adapted).max() <= 1e-5


def test_import_lora_created_by_peft(unet_folder, inputs, tmp_path):
    """A LoRA made by PEFT in torch (rsLoRA, alpha ≠ r, random B, a conv) imports into our adapters exactly."""
    from peft import LoraConfig

    from metalora.models.loading import load_unet

    model = load_unet(unet_folder)
    targets = (r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)", r".*ff\.net\.(0\.proj|2)", r".*resnets\.\d+\.conv1")
    cfg = LoRAConfig(targets=targets, rank=4, alpha=3.0, num_subjects=2)  # our own scale differs from the file's
    paths = lora.inject(model, cfg, key=jax.random.key(0))

    theirs = torch_unet(unet_folder)
    torch.manual_seed(1)
    theirs.add_adapter(LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=list(paths),
                                  init_lora_weights=False))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    expected = run_torch(theirs, inputs)
    theirs.save_lora_adapter(str(tmp_path / "peft"), weight_name="pytorch_lora_weights.safetensors")

    assert export.import_lora(model, tmp_path / "peft", subject=1) == "diffusers"
    ours = run_ours(lora.take_subject(model, 1), inputs)
    base = run_ours(lora.take_subject(model, 0), inputs)  # subject 0 untouched: still the base model
    assert np.abs(expected - base).max() > 0.05
    assert np.abs(ours - expected).max() <= 1e-4


# ------------------------------------------------------------------------------------- file logic on a toy
class Attn(nnx.Module):
    def __init__(self, rngs):
        self.to_q = nnx.Linear(6, 6, rngs=rngs)
        self.to_out = nnx.List([nnx.Linear(6, 6, rngs=rngs), nnx.Dropout(0.0)])


class Toy(nnx.Module):
    def __init__(self, rngs):
        self.down_blocks = nnx.List([Block(rngs)])


class Block(nnx.Module):
    def __init__(self, rngs):
        self.attn1 = Attn(rngs)
        self.resnets = nnx.List([Resnet(rngs)])


class Resnet(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 5, (3, 3), strides=2, padding=1, rngs=rngs)


TOY_TARGETS = (r".*attn1\.(to_q|to_out\.0)", r".*resnets\.0\.conv1")


def toy(config):
    model = Toy(nnx.Rngs(0))
    lora.inject(model, config, key=jax.random.key(3))
    randomize_heads(model, jax.random.key(4))
    return model


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_export_import_round_trip_is_exact(fmt, tmp_path):
    cfg = LoRAConfig(targets=TOY_TARGETS, rank=3, alpha=6.0, num_subjects=3)
    src = toy(cfg)
    path = (export.export_diffusers(src, 2, tmp_path) if fmt == "diffusers"
            else export.export_kohya(src, 2, tmp_path / "k.safetensors"))
    dst = Toy(nnx.Rngs(0))
    lora.inject(dst, LoRAConfig(targets=TOY_TARGETS, rank=3, alpha=1.5, num_subjects=2), key=jax.random.key(9))
    assert export.import_lora(dst, path, subject=0) == fmt
    for (_, a), (_, b) in zip(lora.iter_adapters(src), lora.iter_adapters(dst)):
        np.testing.assert_allclose(np.asarray(b.delta_kernel(0)), np.asarray(a.delta_kernel(2)), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(b.lora_up[...][1]), 0)  # other subjects untouched


def test_three_factor_export_matches_delta(tmp_path):
    """The exported B·A (scale 1) is our s·D·M·U, conv included, in torch layout."""
    model = toy(LoRAConfig(targets=TOY_TARGETS, rank=3, mid_rank=2, alpha=5.0, down_role="meta", num_subjects=2))
    tensors = load_file(str(export.export_diffusers(model, 1, tmp_path)))
    for path, adapter in lora.iter_adapters(model):
        key = ".".join(map(str, path))
        a, b = tensors[f"unet.{key}.lora_A.weight"], tensors[f"unet.{key}.lora_B.weight"]
        delta = np.asarray(adapter.delta_kernel(1))
        if a.ndim == 4:  # conv: torch (out, in, kh, kw) = einsum over the rank
            got = np.einsum("or,rihw->hwio", b[:, :, 0, 0], a)
        else:
            got = (b @ a).T
        np.testing.assert_allclose(got, delta, rtol=1e-5, atol=1e-6)


def test_bad_keys_are_named(tmp_path):
    cfg = LoRAConfig(targets=TOY_TARGETS, rank=3, num_subjects=1)
    model = toy(cfg)
    good = load_file(str(export.export_diffusers(model, 0, tmp_path / "good")))
    q = "unet.down_blocks.0.attn1.to_q"
    before = jax.tree.map(np.asarray, nnx.state(model, lora.SubjectParam))

    def write(tensors, name):
        path = tmp_path / name / "pytorch_lora_weights.safetensors"
        path.parent.mkdir()
        save_file(tensors, str(path))
        return path

    missing = {k: v for k, v in good.items() if not k.startswith(q)}
    with pytest.raises(export.LoRAFileError, match=r"1 missing:\n  down_blocks\.0\.attn1\.to_q"):
        export.import_lora(model, write(missing, "missing"))
    extra = {**good, "unet.down_blocks.0.attn1.to_k.lora_A.weight": np.zeros((3, 6), np.float32),
             "unet.down_blocks.0.attn1.to_k.lora_B.weight": np.zeros((6, 3), np.float32),
             "unet.down_blocks.0.attn1.to_q.lora_magnitude_vector": np.zeros((6,), np.float32)}
    with pytest.raises(export.LoRAFileError, match=r"2 unexpected:\n  down_blocks\.0\.attn1\.to_k\n"
                                                   r"  unet\.down_blocks\.0\.attn1\.to_q\.lora_magnitude_vector"):
        export.import_lora(model, write(extra, "extra"))
    shaped = {**good, f"{q}.lora_A.weight": np.zeros((2, 6), np.float32)}
    with pytest.raises(export.LoRAFileError, match=r"shape mismatch:\n  down_blocks\.0\.attn1\.to_q\.lora_A/lora_B: "
                                                   r"file A \(2, 6\), B \(6, 3\); model expects A \(3, 6\)"):
        export.import_lora(model, write(shaped, "shaped"))
    kohya = load_file(str(export.export_kohya(model, 0, tmp_path / "k.safetensors")))
    del kohya["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"]
    save_file(kohya, str(tmp_path / "k2.safetensors"))
    with pytest.raises(export.LoRAFileError, match="lora_unet_down_blocks_0_resnets_0_conv1"):
        export.import_lora(model, tmp_path / "k2.safetensors")
    # nothing was written by the failed imports
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(model, lora.SubjectParam)))


def test_only_safetensors(tmp_path):
    model = toy(LoRAConfig(targets=TOY_TARGETS, rank=3))
    (tmp_path / "lora.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickle"):
        export.import_lora(model, tmp_path / "lora.bin")
    with pytest.raises(ValueError, match=r"\.safetensors only"):
        export.export_kohya(model, 0, tmp_path / "lora.pt")
    three = toy(LoRAConfig(targets=TOY_TARGETS, rank=3, mid_rank=2, down_role="meta"))
    path = export.export_diffusers(model, 0, tmp_path / "x")
    with pytest.raises(ValueError, match="two-factor adapters"):
        export.import_lora(three, path)


def test_meta_down_import_is_shared(tmp_path):
    """Importing into a meta-role D writes the shared factor (every subject sees the file's A)."""
    src = toy(LoRAConfig(targets=TOY_TARGETS, rank=3, num_subjects=1))
    path = export.export_diffusers(src, 0, tmp_path)
    dst = toy(LoRAConfig(targets=TOY_TARGETS, rank=3, down_role="meta", num_subjects=2))
    export.import_lora(dst, path, subject=1)
    for (_, a), (_, b) in zip(lora.iter_adapters(src), lora.iter_adapters(dst)):
        assert b.lora_down[...].shape == a.lora_down[...].shape[1:]
        np.testing.assert_allclose(np.asarray(b.delta_kernel(1)), np.asarray(a.delta_kernel(0)), rtol=1e-6, atol=1e-7)
        assert jnp.array_equal(b.lora_down[...], a.lora_down[...][0])
