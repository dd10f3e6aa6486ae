"""Layered LoRA core on a small NNX model that uses the diffusers UNet's module naming."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jaxpr_walk import iter_eqns

from metalora import lora
from metalora.lora import LoRAConfig, MetaDownParam, SubjectParam


# ------------------------------------------------------------------------------------------ a diffusers-named toy
class Attention(nnx.Module):
    def __init__(self, dim, context_dim, rngs):
        self.to_q = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        self.to_k = nnx.Linear(context_dim, dim, use_bias=False, rngs=rngs)
        self.to_v = nnx.Linear(context_dim, dim, use_bias=False, rngs=rngs)
        self.to_out = nnx.List([nnx.Linear(dim, dim, rngs=rngs), nnx.Dropout(0.0)])

    def __call__(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        w = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]), axis=-1)
        return self.to_out[1](self.to_out[0](w @ v), deterministic=True)


class GEGLU(nnx.Module):
    def __init__(self, dim, hidden, rngs):
        self.proj = nnx.Linear(dim, 2 * hidden, rngs=rngs)

    def __call__(self, x):
        a, gate = jnp.split(self.proj(x), 2, axis=-1)
        return a * jax.nn.gelu(gate)


class FeedForward(nnx.Module):
    def __init__(self, dim, rngs):
        self.net = nnx.List([GEGLU(dim, 2 * dim, rngs), nnx.Dropout(0.0), nnx.Linear(2 * dim, dim, rngs=rngs)])

    def __call__(self, x):
        return self.net[2](self.net[1](self.net[0](x), deterministic=True))


class TransformerBlock(nnx.Module):
    def __init__(self, dim, context_dim, rngs):
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.attn1 = Attention(dim, dim, rngs)
        self.attn2 = Attention(dim, context_dim, rngs)
        self.ff = FeedForward(dim, rngs)

    def __call__(self, x, context):
        x = x + self.attn1(self.norm(x))
        x = x + self.attn2(x, context)
        return x + self.ff(x)


class Transformer2D(nnx.Module):
    def __init__(self, dim, context_dim, rngs):
        self.norm = nnx.GroupNorm(dim, num_groups=2, rngs=rngs)
        self.proj_in = nnx.Conv(dim, dim, (1, 1), rngs=rngs)
        self.transformer_blocks = nnx.List([TransformerBlock(dim, context_dim, rngs)])
        self.proj_out = nnx.Conv(dim, dim, (1, 1), rngs=rngs)

    def __call__(self, x, context):
        b, h, w, c = x.shape
        t = self.proj_in(self.norm(x)).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            t = block(t, context)
        return x + self.proj_out(t.reshape(b, h, w, c))


class ResnetBlock(nnx.Module):
    def __init__(self, cin, cout, temb_dim, rngs):
        self.conv1 = nnx.Conv(cin, cout, (3, 3), padding=1, rngs=rngs)
        self.time_emb_proj = nnx.Linear(temb_dim, cout, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), strides=2, padding=((1, 0), (0, 1)), rngs=rngs)
        self.conv_shortcut = nnx.Conv(cin, cout, (1, 1), strides=2, padding=0, rngs=rngs)

    def __call__(self, x, temb):
        h = jax.nn.silu(self.conv1(x)) + self.time_emb_proj(temb)[:, None, None, :]
        return self.conv2(h) + self.conv_shortcut(x)


class DownBlock(nnx.Module):
    def __init__(self, rngs):
        self.resnets = nnx.List([ResnetBlock(4, 8, 6, rngs)])
        self.attentions = nnx.List([Transformer2D(8, 5, rngs)])

    def __call__(self, x, temb, context):
        return self.attentions[0](self.resnets[0](x, temb), context)


class ToyUNet(nnx.Module):
    """Mirrors ``down_blocks.0.{resnets,attentions}.0...`` of diffusers; ``conv_in`` lies outside the blocks."""

    def __init__(self, rngs):
        self.conv_in = nnx.Conv(3, 4, (3, 3), padding=1, rngs=rngs)
        self.down_blocks = nnx.List([DownBlock(rngs)])

    def __call__(self, x, temb, context):
        return self.down_blocks[0](self.conv_in(x), temb, context)


def toy_inputs(key, batch):
    kx, kt, kc = jax.random.split(key, 3)
    return (jax.random.normal(kx, (batch, 8, 8, 3)), jax.random.normal(kt, (batch, 6)),
            jax.random.normal(kc, (batch, 7, 5)))


def randomize_heads(model, key, scale=0.3):
    """Non-zero Up factors (and everything else random) so adapters change the output."""
    heads = nnx.state(model, SubjectParam)
    leaves, treedef = jax.tree.flatten(heads)
    keys = jax.random.split(key, len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape)
                                                   for k, x in zip(keys, leaves)]))


def forward(model, x, temb, context):
    return model(x, temb, context)


@jax.jit(static_argnums=0)
def _run(graphdef, state, *args):
    return nnx.merge(graphdef, state)(*args)


def run(model, *args):
    """Jitted forward: eager op-by-op dispatch of the toy costs far more than compiling it once."""
    return _run(*nnx.split(model), *args)


def assert_close(actual, expected, rel=1e-5):
    """max |a - e| ≤ rel · max |e| (float32 reassociation under different batch shapes)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"


META_CFG = LoRAConfig(targets="all_linear_conv", rank=3, mid_rank=2, alpha=4.0, down_role="meta", num_subjects=3)
LORA_CFG = LoRAConfig(targets="all_linear_conv", rank=3, alpha=6.0, down_role="subject", num_subjects=3)


def make(config, seed=0):
    model = ToyUNet(nnx.Rngs(seed))
    paths = lora.inject(model, config, key=jax.random.key(seed + 1))
    return model, paths


# ----------------------------------------------------------------------------------------------------- targets
def test_presets_select_the_documented_layers():
    model = ToyUNet(nnx.Rngs(0))
    names = lambda t: [".".join(map(str, p)) for p, _ in lora.select_targets(model, t)]
    blk = "down_blocks.0.attentions.0.transformer_blocks.0"
    attn = [f"{blk}.attn{i}.{n}" for i in (1, 2) for n in ("to_q", "to_k", "to_v", "to_out.0")]
    assert sorted(names("attn")) == sorted(attn)
    assert sorted(names("attn_ff")) == sorted([*attn, f"{blk}.ff.net.0.proj", f"{blk}.ff.net.2"])
    assert sorted(names("all_linear")) == sorted([*attn, f"{blk}.ff.net.0.proj", f"{blk}.ff.net.2",
                                                  "down_blocks.0.resnets.0.time_emb_proj"])
    convs = [f"down_blocks.0.resnets.0.{n}" for n in ("conv1", "conv2", "conv_shortcut")] + [
        f"down_blocks.0.attentions.0.{n}" for n in ("proj_in", "proj_out")]
    assert sorted(names("all_linear_conv")) == sorted(names("all_linear") + convs)  # conv_in stays frozen
    assert names([r".*attn2\.to_(k|v)"]) == [f"{blk}.attn2.to_k", f"{blk}.attn2.to_v"]


@pytest.mark.parametrize("targets, message", [
    ("qkv", "unknown target preset 'qkv'"),
    ([r".*attn3\.to_q"], r"match no Linear/Conv"),
    ([r".*\.norm"], "GroupNorm"),
])
def test_bad_targets_are_named(targets, message):
    with pytest.raises(ValueError, match=message):
        lora.inject(ToyUNet(nnx.Rngs(0)), LoRAConfig(targets=targets), key=jax.random.key(0))


def test_injection_wraps_in_place_and_remove_restores():
    model, paths = make(META_CFG)
    assert isinstance(model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_out[0], lora.LoRALinear)
    assert isinstance(model.down_blocks[0].resnets[0].conv2, lora.LoRAConv)
    assert len(paths) == len(list(lora.iter_adapters(model))) == 16
    with pytest.raises(ValueError, match="already carries"):
        lora.inject(model, META_CFG, key=jax.random.key(0))
    lora.remove(model)
    assert not list(lora.iter_adapters(model))
    assert isinstance(model.down_blocks[0].resnets[0].conv2, nnx.Conv)


# ------------------------------------------------------------------------------------------------ math & init
def test_scale_rule():
    assert LoRAConfig(rank=8, alpha=16).scale == 2.0
    assert LoRAConfig(rank=8).scale == 1.0  # alpha defaults to r
    assert LoRAConfig(rank=8, mid_rank=4, alpha=16).scale == 4.0  # r = r_up = r_m
    assert LoRAConfig(rank=16, alpha=8, rslora=True).scale == pytest.approx(2.0)
    with pytest.raises(ValueError, match="down_role"):
        LoRAConfig(down_role="shared")


@pytest.mark.parametrize("config", [META_CFG, LORA_CFG], ids=["meta", "lora"])
def test_noop_at_init(config):
    base = ToyUNet(nnx.Rngs(0))
    x = toy_inputs(jax.random.key(2), 2)
    expected = run(base, *x)
    model, _ = make(config)
    graphdef, b, m, heads = lora.split_roles(model)
    # U == 0 makes every subject's adapter an exact no-op; M and D are random (not a saddle).
    for _, adapter in lora.iter_adapters(model):
        assert not np.any(np.asarray(adapter.lora_up[...]))
        assert np.all(np.std(np.asarray(adapter.lora_down[...]).reshape(-1, config.rank), axis=0) > 0)
        if config.mid_rank:
            mid = np.asarray(adapter.lora_mid[...][0])  # (r_d, r_m), r_m ≤ r_d: orthonormal columns
            np.testing.assert_allclose(mid.T @ mid, np.eye(config.mid_rank), atol=1e-5)
    for s in range(3):  # adding s·(h @ 0) is exact
        np.testing.assert_array_equal(np.asarray(run(lora.take_subject(model, s), *x)), np.asarray(expected))
    # vmapped, the base matmuls run at another batch shape, so only float reassociation differs
    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (3, *a.shape)), x)
    out = lora.apply_subjects(forward, graphdef, b, m, heads, *stacked)
    assert_close(out, np.broadcast_to(expected, out.shape))


def test_down_init_matches_peft_bounds():
    model, _ = make(LORA_CFG)
    adapter = model.down_blocks[0].resnets[0].conv1  # D: (S, 3, 3, 4, r); fan_in = 3*3*4
    d = np.asarray(adapter.lora_down[...])
    bound = 1 / np.sqrt(3 * 3 * 4)
    assert d.shape == (3, 3, 3, 4, 3) and np.abs(d).max() <= bound and np.abs(d).max() > 0.8 * bound
    assert not np.allclose(d[0], d[1])  # subjects draw independent heads
    gauss = LoRAConfig(rank=4, down_init="gaussian", targets="attn", num_subjects=64)
    m2, _ = make(gauss)
    d = np.asarray(m2.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.lora_down[...])
    assert abs(d.std() - 1 / 4) < 0.02  # PEFT "gaussian": std 1/r


def test_linear_adapter_closed_form():
    layer = nnx.Linear(5, 7, rngs=nnx.Rngs(0))
    cfg = LoRAConfig(rank=3, mid_rank=2, alpha=5.0, num_subjects=2, down_role="meta")
    adapter = lora.LoRALinear(layer, cfg, key=jax.random.key(1))
    adapter.lora_up[...] = jax.random.normal(jax.random.key(2), (2, 2, 7))
    x = np.asarray(jax.random.normal(jax.random.key(3), (4, 5)))
    w0, b0 = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
    d, m, u = (np.asarray(adapter.lora_down[...]), np.asarray(adapter.lora_mid[...][1]),
               np.asarray(adapter.lora_up[...][1]))
    expected = x @ (w0 + 2.5 * d @ m @ u) + b0
    np.testing.assert_allclose(np.asarray(lora.take_subject(adapter, 1)(x)), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="leading subject axis of size 2"):
        adapter(x)


# ---------------------------------------------------------------------------------------------- merge, subjects
@pytest.mark.parametrize("config", [META_CFG, LORA_CFG], ids=["meta", "lora"])
def test_merged_equals_unmerged(config):
    model, _ = make(config)
    randomize_heads(model, jax.random.key(5))
    x = toy_inputs(jax.random.key(6), 2)
    one = lora.take_subject(model, 1)
    adapted = np.asarray(run(one, *x))
    base_out = np.asarray(run(ToyUNet(nnx.Rngs(0)), *x))
    assert np.abs(adapted - base_out).max() > 1e-2  # the adapters do something
    w0 = {p: np.asarray(a.base.kernel[...]) for p, a in lora.iter_adapters(model)}
    lora.merge_subject(model, 1)
    assert all(a.merged_subject == 1 for _, a in lora.iter_adapters(model))
    merged = np.asarray(run(model, *x))  # merged adapters skip the low-rank path, so no subject axis is touched
    assert_close(merged, adapted)
    lora.unmerge(model)
    for p, a in lora.iter_adapters(model):
        np.testing.assert_allclose(np.asarray(a.base.kernel[...]), w0[p], atol=1e-6)


@pytest.mark.parametrize("config", [META_CFG, LORA_CFG], ids=["meta", "lora"])
def test_subject_indexed_batch_equals_per_subject_calls(config):
    model, _ = make(config)
    randomize_heads(model, jax.random.key(7))
    graphdef, base, meta, heads = lora.split_roles(model)
    x = toy_inputs(jax.random.key(8), 5)
    ids = jnp.array([2, 0, 2, 1, 0])
    mixed = jax.jit(lora.apply_indexed, static_argnums=(0,))(forward, graphdef, base, meta, heads, ids, *x)
    for i, s in enumerate(np.asarray(ids)):
        assert_close(mixed[i:i + 1], run(lora.take_subject(model, int(s)), *(a[i:i + 1] for a in x)))
    # the (S, b, ...) layout gives the same numbers
    per_subject = jax.tree.map(lambda a: a[:3].reshape(3, 1, *a.shape[1:]), x)
    grid = lora.apply_subjects(forward, graphdef, base, meta, heads, *per_subject)
    for s in range(3):
        assert_close(grid[s], run(lora.take_subject(model, s), *(a[s:s + 1] for a in x)))


def test_vmap_does_not_replicate_base_weights():
    model, _ = make(META_CFG)
    graphdef, base, meta, heads = lora.split_roles(model)
    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (3, *a.shape)), toy_inputs(jax.random.key(0), 2))
    jaxpr = jax.make_jaxpr(lambda h: lora.apply_subjects(forward, graphdef, base, meta, h, *stacked))(heads)
    weights = [leaf for leaf in jax.tree.leaves(nnx.filter_state(base, nnx.Param)) + jax.tree.leaves(meta)
               if leaf.ndim >= 2]
    replicated = {(3, *w.shape) for w in weights}
    products = [e for e in iter_eqns(jaxpr.jaxpr) if str(e.primitive) in ("dot_general", "conv_general_dilated")]
    assert products
    bad = [[v.aval.shape for v in e.invars] for e in products
           if any(getattr(v.aval, "shape", None) in replicated for v in e.invars)]
    assert not bad, f"matmuls/convs on per-subject copies of base/meta weights: {bad}"


def test_fresh_heads_and_pool_reinit():
    model, _ = make(META_CFG)
    randomize_heads(model, jax.random.key(9))
    _, _, _, heads = lora.split_roles(model)
    fresh = jax.jit(lambda k: lora.init_subject_state(model, k, 5))(jax.random.key(3))
    assert lora.num_subjects(fresh) == 5
    assert jax.tree.structure(fresh) == jax.tree.structure(heads)
    graphdef, base, meta, _ = lora.split_roles(model)
    for path, adapter in lora.iter_adapters(lora.merge_roles(graphdef, base, meta, fresh)):
        assert not np.any(np.asarray(adapter.lora_up[...])), path
        assert adapter.lora_mid[...].shape[0] == 5
    assert all(np.any(np.asarray(u[...])) for u in jax.tree.leaves(heads))  # the model's own heads untouched
    reset = jnp.array([True, False, True])
    pooled = lora.reinit_subjects(model, heads, jax.random.key(4), reset)
    for new, old in zip(jax.tree.leaves(pooled), jax.tree.leaves(heads)):
        np.testing.assert_array_equal(np.asarray(new[1]), np.asarray(old[1]))
    ups = [a for p, a in nnx.to_flat_state(pooled) if p[-1] == "lora_up"]
    assert all(not np.any(np.asarray(u[...][0])) and not np.any(np.asarray(u[...][2])) for u in ups)


# ------------------------------------------------------------------------------------------------- roles, grads
def test_role_split_and_frozen_down_gets_no_gradient():
    model, _ = make(META_CFG)
    randomize_heads(model, jax.random.key(10))
    graphdef, base, meta, heads = lora.split_roles(model)
    # types, not names: every D is meta, every M/U is a subject factor, nothing adapter-ish in base
    assert {p[-1] for p, _ in nnx.to_flat_state(meta)} == {"lora_down"}
    assert {p[-1] for p, _ in nnx.to_flat_state(heads)} == {"lora_mid", "lora_up"}
    assert not any(str(p[-1]).startswith("lora_") for p, _ in nnx.to_flat_state(base))
    x = jax.tree.map(lambda a: a[None], toy_inputs(jax.random.key(11), 2))

    def loss(h, m):
        out = lora.apply_subjects(forward, graphdef, base, m, jax.tree.map(lambda a: a[:1], h), *x)
        return jnp.mean(out ** 2)

    g_heads = jax.jit(jax.grad(loss))(heads, meta)
    assert jax.tree.structure(g_heads) == jax.tree.structure(heads)  # no D in the subject gradient at all
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(g_heads))
    # subjects 1, 2 are not in the batch: zero gradient; the meta gradient exists when asked for
    assert all(not np.any(np.asarray(g[1:])) for g in jax.tree.leaves(g_heads))
    g_meta = jax.jit(jax.grad(loss, argnums=1))(heads, meta)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(g_meta))

    # an optimiser built for the subject role leaves D and the base bit-identical
    before_meta = jax.tree.map(np.asarray, nnx.state(model, MetaDownParam))
    before_base = jax.tree.map(np.asarray, nnx.state(model, lora.BASE))
    one = lora.take_subject(model, 0)
    opt = nnx.Optimizer(one, optax.sgd(0.1), wrt=lora.role_filter("subject"))
    g1 = jax.tree.map(lambda g: g[0], g_heads)
    opt.update(one, g1)
    jax.tree.map(np.testing.assert_array_equal, before_meta, jax.tree.map(np.asarray, nnx.state(one, MetaDownParam)))
    jax.tree.map(np.testing.assert_array_equal, before_base, jax.tree.map(np.asarray, nnx.state(one, lora.BASE)))
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a[0]) - np.asarray(b)).max(), heads,
                         nnx.state(one, SubjectParam))
    assert max(jax.tree.leaves(moved)) > 0


def test_lora_baseline_down_is_a_subject_factor_on_the_same_code_path():
    model, _ = make(LORA_CFG)
    _, _, meta, heads = lora.split_roles(model)
    assert not jax.tree.leaves(meta)
    assert {p[-1] for p, _ in nnx.to_flat_state(heads)} == {"lora_down", "lora_up"}
    assert all(type(a) in (lora.LoRALinear, lora.LoRAConv) for _, a in lora.iter_adapters(model))


def test_closed_form_up_gradient():
    """∂/∂U of ⟨g, s·U(M(Dx))⟩ summed over examples is s·(M D x)ᵀ g."""
    layer = nnx.Linear(5, 4, rngs=nnx.Rngs(0))
    cfg = LoRAConfig(rank=3, mid_rank=2, alpha=3.0, down_role="meta")
    adapter = lora.take_subject(lora.LoRALinear(layer, cfg, key=jax.random.key(1)), 0)
    x = jax.random.normal(jax.random.key(2), (6, 5))
    g = jax.random.normal(jax.random.key(3), (6, 4))
    graphdef, base, meta, heads = lora.split_roles(adapter)
    grad = jax.grad(lambda h: jnp.sum(g * lora.merge_roles(graphdef, base, meta, h)(x)))(heads)
    d, m = np.asarray(adapter.lora_down[...]), np.asarray(adapter.lora_mid[...])
    expected = 1.5 * (np.asarray(x) @ d @ m).T @ np.asarray(g)
    np.testing.assert_allclose(np.asarray(grad["lora_up"][...]), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad["lora_mid"][...]), 0)  # U = 0 ⇒ ∂/∂M = 0 at init


# ------------------------------------------------------------------------------------------------- accounting
def test_parameter_accounting_closed_form():
    model, _ = make(META_CFG)
    counts = lora.count_parameters(model)
    base_model = ToyUNet(nnx.Rngs(0))
    base_total = sum(x.size for x in jax.tree.leaves(nnx.state(base_model, nnx.Param)))
    assert counts.base == base_total
    meta = per = 0
    for _, a in lora.iter_adapters(model):
        fan_in = int(np.prod(a.down_shape[:-1]))
        meta += fan_in * 3
        per += 3 * 2 + 2 * a.out_features
    assert (counts.meta, counts.per_subject, counts.num_subjects) == (meta, per, 3)
    assert counts.subject_total == 3 * per
    abstract = nnx.eval_shape(lambda: make(META_CFG)[0])
    assert lora.count_parameters(abstract) == counts
