"""MegaPortrait-style pipeline: control images, DDIM edits (SDEdit / known-region), the world's ControlNet
(no-op at init, training, diffusers round trip) and the identity → shading → harmonisation steps."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metalora.data import controls as C
from metalora.data import world
from metalora.diffusion import NoiseSchedule, ddim_edit, ddim_sample
from metalora.diffusion.samplers import edit_start_step
from metalora.meta import megaportrait as mp
from metalora.models import base_model as bm

# ----------------------------------------------------------------------------------------------------------------
# Control images
# ----------------------------------------------------------------------------------------------------------------

NO_JITTER = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
FRONTAL = {"pose": "frontal", "expression": "neutral", "lighting": "front"}


def _centroid_x(weights: np.ndarray) -> float:
    return float((weights * np.arange(weights.shape[1])[None]).sum() / weights.sum())


def test_controls_are_pure_in_range_and_shaped():
    s = world.render_sample(0, 3, 5, 32)
    a = C.photo_controls(s.image, s.attributes, s.jitter)
    b = C.photo_controls(s.image, s.attributes, s.jitter)
    for name in C.CONTROL_GROUPS:
        assert a[name].shape == (32, 32, C.GROUP_CHANNELS[name]) and a[name].dtype == np.float32
        assert 0.0 <= a[name].min() and a[name].max() <= 1.0 and a[name].max() > 0.5
        np.testing.assert_array_equal(a[name], b[name])


def test_landmarks_follow_pose_and_placement():
    left = C.landmark_map({**FRONTAL, "pose": "left"}, NO_JITTER, 64)
    right = C.landmark_map({**FRONTAL, "pose": "right"}, NO_JITTER, 64)
    frontal = C.landmark_map(FRONTAL, NO_JITTER, 64)
    # The nose (blue) turns with the head; the frontal face's eyes are centred.
    assert _centroid_x(left[..., 2]) < _centroid_x(frontal[..., 2]) - 2 < _centroid_x(right[..., 2]) - 4
    assert _centroid_x(frontal[..., 1]) == pytest.approx(31.5, abs=0.7)
    shifted = C.landmark_map(FRONTAL, np.array([1.0, 0.1, 0.0, 0.0], np.float32), 64)  # dx = 10% of the width
    assert _centroid_x(shifted[..., 1]) - _centroid_x(frontal[..., 1]) == pytest.approx(6.4, abs=0.5)
    # An average face carries no identity: the landmarks of two identities' photos in one pose are the same map.
    s1, s2 = world.render_sample(0, 1, 0, 32), world.render_sample(0, 2, 0, 32)
    same = {**s1.attributes, **FRONTAL}
    np.testing.assert_array_equal(C.landmark_map(same, s1.jitter, 32), C.landmark_map({**s2.attributes, **FRONTAL},
                                                                                       s1.jitter, 32))


def test_shading_follows_the_light():
    def left_minus_right(lighting):
        gain = C.shading_map({**FRONTAL, "lighting": lighting}, NO_JITTER, 32)[..., 0]
        return gain[:, :16].sum() - gain[:, 16:].sum()

    assert left_minus_right("left") > 5 and left_minus_right("right") < -5
    assert abs(left_minus_right("front")) < 1.0


def test_inpaint_condition_blanks_the_head_region():
    s = world.render_sample(0, 4, 1, 32)
    mask = C.head_mask(s.jitter, 32)
    cond = C.inpaint_condition(s.image, mask)
    inside, outside = mask > 0.99, mask < 0.01
    assert inside.sum() > 200 and outside.sum() > 100
    assert np.all(cond[inside][:, :3] < 0.011)
    np.testing.assert_allclose(cond[outside][:, :3], s.image[outside] / 255.0, atol=0.011)
    np.testing.assert_array_equal(cond[..., 3], mask)


def test_control_image_zeroes_disabled_groups_and_refuses_bad_input():
    s = world.render_sample(0, 4, 1, 32)
    groups = C.photo_controls(s.image, s.attributes, s.jitter)
    full = C.control_image(groups, 32, dict.fromkeys(C.CONTROL_GROUPS, True))
    only_shading = C.control_image(groups, 32, {"shading": True})
    sl = C.group_slices()
    assert full.shape == (32, 32, C.CONTROL_CHANNELS)
    np.testing.assert_array_equal(only_shading[..., sl["shading"]], full[..., sl["shading"]])
    assert not only_shading[..., sl["landmarks"]].any() and not only_shading[..., sl["inpaint"]].any()
    with pytest.raises(KeyError, match="unknown control groups"):
        C.control_image({"depth": groups["shading"]}, 32)
    with pytest.raises(ValueError, match="expected"):
        C.control_image({"shading": groups["shading"][:16]}, 32, {"shading": True})
    with pytest.raises(ValueError, match="lighting"):
        C.shading_map({**FRONTAL, "lighting": "above"}, NO_JITTER, 32)


# ----------------------------------------------------------------------------------------------------------------
# DDIM edits
# ----------------------------------------------------------------------------------------------------------------

SCHEDULE = NoiseSchedule.create(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                                timestep_spacing="trailing", clip_sample=False)


def _linear_model(params, x, t, cond):
    """Some deterministic network: enough to tell which steps ran from which input."""
    return jnp.tanh(params["w"] * x + cond + 1e-3 * t[:, None, None, None])


def _oracle(params, x, t, cond):
    """The v-prediction of a model that knows x_0 = ``cond``: DDIM then lands exactly on it."""
    a = SCHEDULE.alphas_cumprod[t][:, None, None, None]
    eps = (x - jnp.sqrt(a) * cond) / jnp.sqrt(1.0 - a)
    return jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * cond


def test_edit_start_step():
    assert edit_start_step(25, 0.4) == 15 and edit_start_step(25, 1.0) == 0 and edit_start_step(25, 0.0) == 25
    with pytest.raises(ValueError, match="strength"):
        edit_start_step(25, 1.5)


def test_ddim_edit_runs_the_tail_of_ddim_sample():
    """An edit from the point ``ddim_sample``'s trajectory passes through ends where that sample ends."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    noise = jax.random.normal(k1, (2, 4, 4, 3))
    cond = 0.3 * jax.random.normal(k2, (2, 4, 4, 3))
    params = {"w": jnp.float32(0.7)}
    n, strength = 10, 0.4
    final, trajectory = ddim_sample(_linear_model, params, SCHEDULE, noise, cond, num_inference_steps=n,
                                    return_trajectory=True)
    start = edit_start_step(n, strength)
    a = SCHEDULE.alphas_cumprod[int(SCHEDULE.inference_timesteps(n)[start])]
    edit_noise = jax.random.normal(k3, noise.shape)
    image = (trajectory[start - 1] - jnp.sqrt(1.0 - a) * edit_noise) / jnp.sqrt(a)  # noises back to that point
    out = ddim_edit(_linear_model, params, SCHEDULE, image, edit_noise, cond, num_inference_steps=n,
                    strength=strength)
    np.testing.assert_allclose(np.asarray(out), np.asarray(final), atol=2e-5)
    np.testing.assert_array_equal(ddim_edit(_linear_model, params, SCHEDULE, image, edit_noise, cond,
                                            num_inference_steps=n, strength=0.0), image)


def test_ddim_edit_keeps_the_known_region_and_redraws_the_rest():
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    image = jax.random.uniform(k1, (2, 8, 8, 3), minval=-1, maxval=1)
    target = jax.random.uniform(k2, (2, 8, 8, 3), minval=-1, maxval=1)
    keep = jnp.zeros((2, 8, 8, 1)).at[:, :, :4].set(1.0)
    out = ddim_edit(_oracle, {}, SCHEDULE, image, jax.random.normal(k3, image.shape), target,
                    num_inference_steps=10, strength=0.5, keep_mask=keep)
    np.testing.assert_array_equal(np.asarray(out[:, :, :4]), np.asarray(image[:, :, :4]))
    np.testing.assert_allclose(np.asarray(out[:, :, 4:]), np.asarray(target[:, :, 4:]), atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# The ControlNet and the pipeline
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    model, params = bm.load_base("random:smoke")
    portrait, controlnet = mp.new_controlnet(model, params, key=jax.random.key(0))
    samples = [world.render_sample(0, i, i, model.resolution) for i in range(2)]
    images = np.stack([s.image for s in samples])
    control = mp.template_controls(images, [s.attributes for s in samples], [s.jitter for s in samples])
    ids = model.tokenize([world.make_caption(s.attributes, identifier="sks") for s in samples])
    return model, params, portrait, controlnet, images, jnp.asarray(control), jnp.asarray(ids)


def _perturbed(state: nnx.State, key) -> nnx.State:
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_fresh_controlnet_leaves_the_unet_unchanged(tiny):
    model, params, portrait, controlnet, _, control, ids = tiny
    x = jax.random.normal(jax.random.key(2), (2, *model.sample_shape))
    t = jnp.array([10, 900])
    context = bm.encode_text(model, params["text_encoder"], ids)
    cond = {"context": context, "control": control, "scale": jnp.ones(2)}
    with_control = mp.controlled_unet(model.unet_def, portrait.controlnet_def,
                                      {"unet": params["unet"], "controlnet": controlnet}, x, t, cond)
    plain = bm.apply_unet(model.unet_def, params["unet"], x, t, context)
    np.testing.assert_array_equal(np.asarray(with_control), np.asarray(plain))
    # ... and a trained one (here: perturbed) does change it, more with a larger scale.
    moved = mp.controlled_unet(model.unet_def, portrait.controlnet_def,
                               {"unet": params["unet"], "controlnet": _perturbed(controlnet, jax.random.key(3))},
                               x, t, cond)
    assert float(jnp.abs(moved - plain).mean()) > 1e-3


def test_control_loss_sees_only_the_chosen_groups(tiny):
    _, params, portrait, controlnet, images, control, ids = tiny
    x0 = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    key = jax.random.key(7)

    def loss(cn, groups):
        return float(mp.control_loss(portrait, cn, params, x0, ids, control, key, groups=groups, repeats=2))

    fresh = {groups: loss(controlnet, groups) for groups in ((), ("landmarks",), C.CONTROL_GROUPS)}
    assert len(set(fresh.values())) == 1  # zero convolutions: no group changes anything
    trained = _perturbed(controlnet, jax.random.key(8))
    only = {name: loss(trained, (name,)) for name in C.CONTROL_GROUPS}
    assert len(set(only.values())) == 3 and loss(trained, ()) not in only.values()
    # the chosen groups are all it sees: zeroing the others in the input changes nothing
    sl = C.group_slices()["landmarks"]
    landmarks_only = jnp.zeros_like(control).at[..., sl].set(control[..., sl])
    assert float(mp.control_loss(portrait, trained, params, x0, ids, landmarks_only, key, groups=("landmarks",),
                                 repeats=2)) == only["landmarks"]


def test_drop_groups_drops_whole_groups(tiny):
    control = jnp.ones((64, 4, 4, C.CONTROL_CHANNELS))
    dropped = np.asarray(mp.drop_groups(jax.random.key(0), control, 0.5))
    for sl in C.group_slices().values():
        per_example = dropped[..., sl].reshape(64, -1)
        assert np.all((per_example == 0).all(1) | (per_example == 1).all(1))  # a group is all on or all off
        assert 10 < per_example[:, 0].sum() < 54
    np.testing.assert_array_equal(mp.drop_groups(jax.random.key(0), control, 1.0), control)


def test_step_control_and_grow_mask():
    control = jnp.arange(2 * 3 * 3 * C.CONTROL_CHANNELS, dtype=jnp.float32).reshape(2, 3, 3, -1) + 1
    sl = C.group_slices()
    for step, groups in mp.STEP_GROUPS.items():
        out = np.asarray(mp.step_control(control, step))
        for name in C.CONTROL_GROUPS:
            assert (out[..., sl[name]] != 0).all() if name in groups else not out[..., sl[name]].any()
    mask = jnp.zeros((1, 7, 7)).at[0, 3, 3].set(1.0)
    grown = np.asarray(mp.grow_mask(mask, 1))[0]
    expected = np.zeros((7, 7))
    expected[2:5, 2:5] = 1
    np.testing.assert_array_equal(grown, expected)


def test_pipeline_keeps_the_template_outside_the_head(tiny):
    model, params, portrait, controlnet, images, control, ids = tiny
    config = mp.PortraitConfig(num_inference_steps=4, shading_strength=0.5, harmonize_strength=0.5, seam_pixels=1)
    trained = _perturbed(controlnet, jax.random.key(4))
    template = jnp.asarray(images, jnp.float32) / 255.0
    keys = jax.random.split(jax.random.key(5), 2)
    out = mp.run(portrait, {"unet": params["unet"], "controlnet": trained}, params["text_encoder"], template,
                 control, ids, keys, config)
    assert set(out) == {"identity", "shading", "pasted", "harmonize"}
    for v in out.values():
        assert v.shape == (2, *model.sample_shape) and 0.0 <= float(v.min()) and float(v.max()) <= 1.0
    head = control[..., C.group_slices()["inpaint"]][..., -1]
    keep = np.asarray(1.0 - mp.grow_mask(head, 1)) == 1.0
    assert keep.sum() > 50
    np.testing.assert_allclose(np.asarray(out["harmonize"])[keep], np.asarray(template)[keep], atol=1e-6)
    assert float(jnp.abs(out["harmonize"] - out["pasted"]).max()) > 1e-3  # the head and seam were re-drawn
    with pytest.raises(ValueError, match="strength"):
        mp.PortraitConfig(shading_strength=2.0)


def test_per_step_control_scales_reach_only_their_step(tiny):
    _, params, portrait, controlnet, images, control, ids = tiny
    trained = _perturbed(controlnet, jax.random.key(4))
    template = jnp.asarray(images, jnp.float32) / 255.0
    keys = jax.random.split(jax.random.key(5), 2)

    def run(**scales):
        config = mp.PortraitConfig(num_inference_steps=4, shading_strength=0.5, harmonize_strength=0.5, **scales)
        return jax.device_get(mp.run(portrait, {"unet": params["unet"], "controlnet": trained},
                                     params["text_encoder"], template, control, ids, keys, config))

    uniform = run(control_scale=2.0)
    same = run(control_scale=0.0, step_control_scales=[2.0, 2.0, 2.0])  # a config file's list; overrides the scale
    for name in uniform:
        np.testing.assert_array_equal(same[name], uniform[name])
    harmonize_only = run(control_scale=2.0, step_control_scales=(2.0, 2.0, 5.0))
    for name in ("identity", "shading", "pasted"):
        np.testing.assert_array_equal(harmonize_only[name], uniform[name])
    assert np.abs(harmonize_only["harmonize"] - uniform["harmonize"]).max() > 1e-4
    identity_only = run(control_scale=2.0, step_control_scales=(5.0, 2.0, 2.0))
    assert np.abs(identity_only["identity"] - uniform["identity"]).max() > 1e-4
    with pytest.raises(ValueError, match="one scale per step"):
        mp.PortraitConfig(step_control_scales=(1.0, 2.0))


def test_controlnet_round_trips_through_disk_and_diffusers(tiny, tmp_path):
    import torch
    from diffusers import ControlNetModel as TorchControlNet

    from metalora.models.convert import export_torch_state

    model, _, portrait, controlnet, *_ = tiny
    trained = _perturbed(controlnet, jax.random.key(6))
    folder = mp.save_controlnet(tmp_path / "cn", portrait, trained, info={"steps": 3})
    assert json.loads((folder / "metalora_info.json").read_text())["steps"] == 3
    _, loaded = mp.load_portrait(model, folder)
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    torch_net = TorchControlNet.from_pretrained(folder)  # diffusers reads the same folder, every key
    ours = export_torch_state(nnx.merge(portrait.controlnet_def, trained))
    theirs = torch_net.state_dict()
    assert set(ours) == set(theirs)
    np.testing.assert_array_equal(ours["controlnet_cond_embedding.conv_in.weight"],
                                  theirs["controlnet_cond_embedding.conv_in.weight"].to(torch.float32).numpy())
    wrong = dataclasses.replace(nnx.merge(portrait.controlnet_def, trained).config, conditioning_channels=3)
    from metalora.models.controlnet import ControlNetModel

    with pytest.raises(ValueError, match="conditioning_channels=3"):
        mp.from_controlnet(model, ControlNetModel(wrong, rngs=nnx.Rngs(0)))


# ----------------------------------------------------------------------------------------------------------------
# As a benchmark method: templates for text prompts
# ----------------------------------------------------------------------------------------------------------------


def _ids(**attrs) -> np.ndarray:
    full = {"pose": "frontal", "expression": "neutral", "glasses": "none", "hat": "none", "background": "white",
            "lighting": "front"}
    return world.attribute_ids(full | attrs)


def test_match_templates_prefers_photos_that_show_the_prompt():
    pool = np.stack([_ids(), _ids(), _ids(background="blue"), _ids(), _ids(background="blue", glasses="red"),
                     _ids(hat="green")])
    rng = np.random.default_rng(0)
    picks, shown = mp.match_templates(pool, {"background": "blue", "glasses": "red"}, 1, rng)
    assert picks.tolist() == [4] and shown == 1.0
    picks, shown = mp.match_templates(pool, {"background": "blue"}, 2, rng)
    assert sorted(picks.tolist()) == [2, 4] and shown == 1.0  # distinct while there are enough
    picks, _ = mp.match_templates(pool, {"background": "blue"}, 5, rng)
    assert set(picks.tolist()) == {2, 4}  # more samples than matches: repeats, never a worse match
    picks, shown = mp.match_templates(pool, {"background": "blue", "hat": "red"}, 3, rng)
    assert set(picks.tolist()) <= {2, 4} and shown == 0.5  # no photo shows both: the best half-matches
    picks, shown = mp.match_templates(pool, {}, 6, rng)
    assert sorted(picks.tolist()) == list(range(6)) and shown == 1.0
    with pytest.raises(ValueError, match="background='plaid'"):
        mp.match_templates(pool, {"background": "plaid"}, 1, rng)


@pytest.fixture(scope="module")
def smoke_pool():
    from metalora.data import builders

    builder = builders.prepare(builders.synth_builder("smoke"))
    return mp.template_pool(builders.data_source(builder, "meta_train", decode_images=False),
                            builders.data_source(builder, "meta_train"))


def test_prompt_templates_show_what_each_prompt_asks_for(smoke_pool):
    from metalora.data import protocol

    prompts = [protocol.evaluation_prompts([{"background": "white", "glasses": "none", "hat": "none",
                                             "pose": "frontal", "expression": "neutral"}], identity=i)[:3]
               for i in range(2)]
    inputs, info = mp.prompt_templates(smoke_pool, prompts, 2, seed=0)
    assert inputs["template"].shape == (2, 6, 32, 32, 3)
    assert inputs["control"].shape == (2, 6, 32, 32, C.CONTROL_CHANNELS)
    assert np.array(info["template_records"]).shape == (2, 6)
    pool_attributes = [world.attributes_from_ids(a) for a in smoke_pool.attribute_ids]
    fractions = []
    for s, subject_prompts in enumerate(prompts):
        for j, record in enumerate(info["template_records"][s]):
            row = smoke_pool.source[record]
            attrs = world.attributes_from_ids(row["attributes"])
            wanted = subject_prompts[j // 2].attributes

            def shows(a, wanted=wanted):
                return sum(a[k] == v for k, v in wanted.items())

            assert shows(attrs) == max(shows(a) for a in pool_attributes)  # no photo of the split shows more
            fractions.append(shows(attrs) / len(wanted))
            np.testing.assert_array_equal(inputs["template"][s, j], np.asarray(row["image"]) / np.float32(255))
            np.testing.assert_array_equal(inputs["control"][s, j], C.photo_control_image(
                np.asarray(row["image"]), attrs, np.asarray(row["jitter"])))
    assert info["template_attribute_match"] == pytest.approx(np.mean(fractions[::2]))  # per prompt, as recorded
    again, _ = mp.prompt_templates(smoke_pool, prompts, 2, seed=0)
    np.testing.assert_array_equal(again["template"], inputs["template"])  # seeded


def test_megaportrait_method_adapts_as_its_base_method_and_keeps_the_template(tiny, smoke_pool):
    from metalora.data import protocol
    from metalora.eval import methods as methods_lib
    from metalora.meta.inner import diffusion_example_loss

    model, params, portrait, controlnet, *_ = tiny
    personal = methods_lib.lora_method("lora", model, params, diffusion_example_loss(model.schedule), rank=2,
                                       key=jax.random.key(0))
    config = mp.PortraitConfig(seam_pixels=1)
    method = methods_lib.megaportrait_method(personal, portrait, _perturbed(controlnet, jax.random.key(4)), smoke_pool,
                                             config)
    assert method.name == "megaportrait" and method.loss is personal.loss and method.init is personal.init
    assert method.trainable_parameters == personal.trainable_parameters
    prompts = [protocol.evaluation_prompts([{"background": "white"}], identity=3)[:2]]
    inputs, _ = method.sampling_inputs(prompts, 1)
    ids = jnp.asarray(model.tokenize([p.text for p in prompts[0]]))
    trainable = personal.init(jax.random.key(1))
    images = method.sample(trainable, ids, jax.random.split(jax.random.key(2), 2), 3, 2.0,
                           jax.tree.map(lambda x: x[0], inputs))
    assert images.shape == (2, *model.sample_shape)
    head = jnp.asarray(inputs["control"][0])[..., C.group_slices()["inpaint"]][..., -1]
    keep = np.asarray(1.0 - mp.grow_mask(head, 1)) == 1.0
    np.testing.assert_allclose(np.asarray(images)[keep], inputs["template"][0][keep], atol=1e-6)
    assert float(np.abs(np.asarray(images)[~keep] - inputs["template"][0][~keep]).mean()) > 1e-3
    with pytest.raises(ValueError, match="tuned method"):
        methods_lib.megaportrait_method(dataclasses.replace(personal, init_from_shots=lambda k, s: None), portrait,
                                        controlnet, smoke_pool, config)


# ----------------------------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------------------------


def test_train_controlnet_smoke_and_batches(tmp_path):
    from configs import controlnet_tiny
    from experiments import train_controlnet

    config = controlnet_tiny.get_config("smoke")
    results = train_controlnet.main(config, tmp_path)
    assert results["finished"] and np.isfinite(results["final_metrics"]["train/loss"])
    model, _ = bm.load_base("random:smoke")
    _, loaded = mp.load_portrait(model, results["controlnet"])
    assert sum(x.size for x in jax.tree.leaves(loaded)) == results["trainable_parameters"]
    # Batches are a pure function of (seed, step); a flipped photo has flipped controls.
    from metalora.data import builders

    source = builders.data_source(builders.prepare(builders.track_builder(config.data, resolution=32)), "meta_train")
    data = train_controlnet.ControlBatches(source, model.tokenizer, batch_size=4, seed=0, flip_prob=1.0)
    a, b = data.batch(7), data.batch(7)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    unflipped = train_controlnet.ControlBatches(source, model.tokenizer, batch_size=4, seed=0, flip_prob=0.0).batch(7)
    np.testing.assert_array_equal(a["control"], unflipped["control"][:, :, ::-1])
    np.testing.assert_array_equal(a["images"], unflipped["images"][:, :, ::-1])


@pytest.mark.slow
def test_megaportrait_benchmark_smoke(tmp_path):
    from benchmarks import megaportrait
    from configs import megaportrait_tiny

    out = megaportrait.run(megaportrait_tiny.get_config("smoke"), tmp_path, log=lambda *_: None)
    assert set(out["summary"]) == set(megaportrait.ROWS)
    template = out["summary"]["template"]
    assert template["template_face_sim"][0] == pytest.approx(1.0, abs=1e-5)  # a template is its own identity
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "table.md").read_text().count("|") > 50
    assert set(out["paired"]) == {f"{a} − {b}" for a, b in megaportrait.PAIRED}
    assert "| portrait − base_portrait | " in (tmp_path / "table.md").read_text()


def test_megaportrait_table_pairs_rows_per_identity_and_template():
    from benchmarks import megaportrait

    rows = {"portrait": [0.5, 0.1, 0.9, 0.3], "base_portrait": [0.4, 0.0, 0.8, 0.2],
            "prompt_only": [0.5, 0.3, 0.7, 0.3]}
    records = {row: {"r_face_sim": v, "pose": [1.0, 0.0, 1.0, 1.0]} for row, v in rows.items()}
    paired = megaportrait.paired_differences(records)
    assert list(paired) == ["portrait − base_portrait", "portrait − prompt_only"]
    # the same +0.1 for every (identity, template): no spread once paired, although the rows spread by ±0.4
    assert paired["portrait − base_portrait"]["r_face_sim"] == pytest.approx((0.1, 0.0, 4))
    mean, ci, n = paired["portrait − prompt_only"]["r_face_sim"]
    assert (mean, n) == (pytest.approx(0.0), 4) and ci > 0.1
    assert paired["portrait − base_portrait"]["pose"][:2] == (0.0, 0.0)
    assert megaportrait.paired_differences({"portrait": records["portrait"]}) == {}  # no reference row scored


def test_shipped_controlnet_loads_on_the_shipped_base():
    from configs import megaportrait_tiny

    model, _ = bm.load_base("")
    portrait, state = mp.load_portrait(model, megaportrait_tiny.get_config().controlnet)
    assert nnx.merge(portrait.controlnet_def, state).config.conditioning_channels == C.CONTROL_CHANNELS
    # trained: the zero convolutions are no longer zero
    assert float(jnp.abs(state["controlnet_mid_block"]["kernel"][...]).max()) > 0
