"""Layered LoRA on the real NNX UNet (loaded from a tiny random diffusers UNet): mixed-subject batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jaxpr_walk import iter_eqns

from metalora import lora
from metalora.lora import LoRAConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    from metalora.models.loading import load_unet

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("unet")
    diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).save_pretrained(folder)
    return load_unet(folder)


def test_unet_mixed_subject_batch(unet):
    model = unet
    lora.inject(model, LoRAConfig(targets="all_linear_conv", rank=3, mid_rank=2, down_role="meta", num_subjects=3),
                key=jax.random.key(0))
    heads = nnx.state(model, lora.SubjectParam)
    leaves, treedef = jax.tree.flatten(heads)
    nnx.update(model, jax.tree.unflatten(treedef, [0.2 * jax.random.normal(jax.random.fold_in(jax.random.key(1), i),
                                                                            x.shape) for i, x in enumerate(leaves)]))
    graphdef, base, meta, heads = lora.split_roles(model)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 12, 12, 4)).astype(np.float32)
    t = np.array([10.0, 500.0, 3.0, 999.0, 250.0], np.float32)
    c = rng.standard_normal((5, 7, 32)).astype(np.float32)
    ids = jnp.array([2, 0, 1, 2, 0])
    fwd = lambda m, *a: m(*a)
    mixed = jax.jit(lora.apply_indexed, static_argnums=(0, 1))(fwd, graphdef, base, meta, heads, ids, x, t, c)

    @jax.jit
    def single(h, *a):
        return lora.merge_roles(graphdef, base, meta, h)(*a)

    outs = [single(lora.take_heads(heads, int(s)), x[i:i + 1], t[i:i + 1], c[i:i + 1])
            for i, s in enumerate(np.asarray(ids))]
    expected = np.concatenate([np.asarray(o) for o in outs])
    assert np.abs(np.asarray(mixed) - expected).max() <= 1e-5 * np.abs(expected).max()
    assert np.abs(expected[0] - expected[1]).max() > 1e-2  # subjects differ

    # no matmul/conv takes a per-example copy of a base or meta weight (vmap must not replicate W). Shapes
    # are chosen so that no activation can look like one: 144/36 tokens, head dim 4, ranks 3/2.
    jaxpr = jax.make_jaxpr(lambda h: lora.apply_indexed(fwd, graphdef, base, meta, h, ids, x, t, c))(heads)
    weights = [leaf for leaf in jax.tree.leaves(nnx.filter_state(base, nnx.Param)) + jax.tree.leaves(meta)
               if leaf.ndim >= 2]
    replicated = {(5, *w.shape) for w in weights}
    bad = [(str(e.primitive), [v.aval.shape for v in e.invars]) for e in iter_eqns(jaxpr.jaxpr)
           if str(e.primitive) in ("dot_general", "conv_general_dilated")
           and any(getattr(v.aval, "shape", None) in replicated for v in e.invars)]
    assert not bad, bad
