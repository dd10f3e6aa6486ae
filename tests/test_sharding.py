"""Sharding rules by role, and 1-device == 8-device numerics for a subject-parallel LoRA step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from metalora.lora import LoRAConfig, MetaDownParam, SubjectParam, apply_subjects, inject, split_roles
from metalora.models.unet import UNet2DConditionModel, UNetConfig
from metalora.sharding import (
    DistributedConfig,
    ShardingRules,
    global_batch,
    initialize_distributed,
    make_mesh,
    partition_spec,
    shard_state,
    state_shardings,
)

SUBJECTS = 8
TINY = UNetConfig(block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=16, attention_head_dim=2,
                  norm_num_groups=8, in_channels=3, out_channels=3,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def lora_unet():
    model = UNet2DConditionModel(TINY, rngs=nnx.Rngs(0))
    inject(model, LoRAConfig(targets="attn", rank=4, mid_rank=4, down_role="meta", num_subjects=SUBJECTS),
           key=jax.random.key(1))
    graphdef, base, meta, subject = split_roles(model)
    # Non-zero Up factors, so that every factor receives a gradient.
    subject = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), subject)
    return graphdef, base, meta, subject


def batch():
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((SUBJECTS, 2, 8, 8, 3), dtype=np.float32),
            "t": rng.uniform(0, 999, (SUBJECTS, 2)).astype(np.float32),
            "ctx": rng.standard_normal((SUBJECTS, 2, 5, 16), dtype=np.float32)}


def loss_fn(meta, subject, graphdef, base, data):
    pred = apply_subjects(lambda m, x, t, c: m(x, t, c), graphdef, base, meta, subject, data["x"], data["t"],
                          data["ctx"])
    return jnp.mean((pred - data["x"]) ** 2)


@needs_8
def test_partition_specs_follow_roles():
    mesh = make_mesh(subject=4, fsdp=2)
    _, base, meta, subject = lora_unet()
    for _, v in nnx.to_flat_state(subject):
        assert isinstance(v, SubjectParam) and partition_spec(v, mesh) == PartitionSpec("subject")
    for _, v in nnx.to_flat_state(meta):
        assert isinstance(v, MetaDownParam) and partition_spec(v, mesh) == PartitionSpec()
    rules = ShardingRules(shard_base=True, min_shard_size=1024)
    specs = {path: partition_spec(v, mesh, rules) for path, v in nnx.to_flat_state(base)}
    kernel = ("down_blocks", 1, "resnets", 0, "conv2", "kernel")  # (3, 3, 32, 32): largest divisible dim sharded
    assert specs[kernel] == PartitionSpec(None, None, "fsdp")
    assert specs[("conv_in", "bias")] == PartitionSpec()  # small: replicated
    assert all(spec == PartitionSpec() for spec in (partition_spec(v, mesh) for _, v in nnx.to_flat_state(base)))


@needs_8
@pytest.mark.parametrize("fsdp", [1, 2])
def test_sharded_step_equals_single_device(fsdp):
    graphdef, base, meta, subject = lora_unet()
    data = batch()
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)), static_argnums=2)
    expected_loss, (expected_meta, expected_subject) = grad_fn(meta, subject, graphdef, base, data)

    mesh = make_mesh(subject=8 // fsdp, fsdp=fsdp)
    rules = ShardingRules(shard_base=fsdp > 1, min_shard_size=1024)
    meta_s, subject_s, base_s = (shard_state(s, mesh, rules) for s in (meta, subject, base))
    data_s = global_batch(data, mesh)
    out_shardings = (jax.sharding.NamedSharding(mesh, PartitionSpec()),
                     (state_shardings(meta, mesh, rules), state_shardings(subject, mesh, rules)))
    sharded = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)), static_argnums=2, out_shardings=out_shardings)
    loss, (g_meta, g_subject) = sharded(meta_s, subject_s, graphdef, base_s, data_s)

    # Heads stay on their subjects' devices; D's gradient is reduced across subjects and replicated.
    leaf = jax.tree.leaves(g_subject)[0]
    assert leaf.sharding.spec == PartitionSpec("subject")
    assert len({s.device for s in leaf.addressable_shards}) == 8
    assert jax.tree.leaves(g_meta)[0].sharding.is_fully_replicated
    # Documented tolerance: the cross-device sum reorders float additions (≈1e-6 relative).
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    for ours, ref in zip(jax.tree.leaves((g_meta, g_subject)), jax.tree.leaves((expected_meta, expected_subject)),
                         strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)


def test_mesh_shape_errors():
    with pytest.raises(ValueError, match="needs"):
        make_mesh(subject=3, fsdp=1, devices=jax.devices()[:2])


def test_single_process_initialize_is_a_noop(monkeypatch):
    monkeypatch.delenv("METALORA_COORDINATOR", raising=False)
    assert initialize_distributed() is False
    with pytest.raises(ValueError, match="num_processes"):
        initialize_distributed(DistributedConfig(coordinator_address="127.0.0.1:1234"))
