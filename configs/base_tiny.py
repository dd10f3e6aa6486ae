"""Base text-to-image model of the procedural world (the stand-in for Stable Diffusion).

    python -m experiments.pretrain_base --config configs/base_tiny.py --workdir runs/base_tiny
    python -m experiments.pretrain_base --config configs/base_tiny.py:smoke --workdir /tmp/smoke   # CI size

Arguments: ``""`` (default run), ``"smoke"`` (tiny model, a few steps, the 12-identity ``smoke`` dataset).
"""

import ml_collections

from configs import common
from metalora.data import world

# Fixed prompts of the sample grids: one row per prompt, one column per seed. They cover every prompted
# attribute (background, glasses/hat with colour, pose, expression) and the bare class prompt.
SAMPLE_ATTRIBUTES = (
    {"background": "blue"},
    {"glasses": "red", "background": "white"},
    {"hat": "yellow", "expression": "smiling", "background": "gray"},
    {"glasses": "blue", "hat": "green", "pose": "left", "background": "pink"},
    {"expression": "surprised", "pose": "right", "background": "green"},
    {"glasses": "black", "expression": "smiling", "pose": "frontal", "background": "orange"},
    {"hat": "purple", "background": "red"},
    {},
)


def sample_prompts() -> list[str]:
    return [world.make_caption(a) for a in SAMPLE_ATTRIBUTES]


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "smoke"):
        raise ValueError(f"configs/base_tiny.py: unknown argument {arg!r}; use '' or 'smoke'")
    smoke = arg == "smoke"
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.resolution = 32
    c.model.block_out_channels = (32, 32, 64)
    c.model.layers_per_block = 1
    c.model.attention_head_dim = 4
    c.model.norm_num_groups = 8
    c.model.text_hidden_size = 64
    c.model.text_layers = 2
    c.model.text_heads = 4
    # > 0: the prompt's hidden states are also attention-pooled into the time embedding (diffusers'
    # addition_embed_type="text"), a direct path for global attributes (background, lighting) to every ResNet.
    c.model.pooled_text_heads = 4
    c.model.max_length = 0  # 0 = the longest caption of the world + BOS/EOS
    c.model.beta_schedule = "squaredcos_cap_v2"
    c.model.prediction_type = "v_prediction"
    c.model.attention_backend = "auto"

    c.data = ml_collections.ConfigDict()
    c.data.source = "synth"  # "synth" (tfds synth_identities) | "folders" (real photos, tfds identity_folders)
    c.data.synth_config = "r32"  # synth_identities builder config
    c.data.folder_root = ""  # folders: identity-folder root ("" = the LFW track, ../shared/data/lfw)
    c.data.data_dir = ""  # tfds cache ("" = $METALORA_TFDS or ~/.cache/metalora/tfds)
    c.data.split = "meta_train"
    c.data.flip_prob = 0.5  # mirrored photos get mirrored pose/lighting captions
    c.data.pad_fraction = 0.0
    c.data.num_threads = 2

    c.train = ml_collections.ConfigDict()
    # Sized for the shared 2-core machine (see assets/base_tiny/README.md for the measured wall time).
    c.train.steps = 1200
    c.train.batch_size = 32  # distinct identities per step, one photo each
    c.train.cond_drop_prob = 0.1  # classifier-free guidance: caption → empty prompt
    # The text tower is trained with the UNet (and frozen afterwards, as SD's CLIP is under personalization). Measured
    # with benchmarks/base_quality.py's caption gain (1 - loss with the right caption / with another photo's caption,
    # at t = 999, raw weights): a frozen random tower gave 2-3% after 300 steps, the r2 base (frozen, 1200 steps,
    # min-SNR, EMA) 0.7%; trained jointly with the plain loss below, 17% after 400 steps. Earlier (r1) a jointly
    # trained tower had collapsed the captions, but under min-SNR weighting, which gives the noisy steps where captions
    # matter no weight.
    c.train.train_text_encoder = True
    # 0 = the plain v-prediction loss. Min-SNR-γ weights a v-loss by min(SNR, γ)/(SNR + 1), ~0 above t ≈ 900
    # (0.02 at t = 900, 1e-4 at t = 990). In this world the noisy image shows background, pose and accessories up to
    # about t = 900, so the caption only helps on exactly those steps: with min-SNR the UNet never learned to read it.
    c.train.min_snr_gamma = 0.0
    # > 0: that share of each batch draws t from [high_noise_start, 1000) instead of [0, 1000) (see
    # metalora.diffusion.sample_timesteps: the steps where the caption decides the image). 0 = plain uniform t, as
    # the shipped base was trained.
    c.train.high_noise_fraction = 0.0
    c.train.high_noise_start = 800
    # Counterfactual pairs (synthetic data only): each photo comes with itself re-rendered with one of these
    # attributes changed (same person, jitter, noise and t), and the loss adds pair_weight × the MSE between the two
    # predictions' difference and the two targets' difference. That difference is the changed attribute alone, which
    # in the plain loss is a tiny share of the pixel variance (pose 0.17 %). () = off, as the shipped base; each pair
    # is two images, so batch_size counts pairs (16 pairs = the compute of 32 photos). Measured (2026-12-03, 1200
    # steps, all five attributes, 16 pairs): prompted attributes 42.6 % (weight 1) / 48.6 % (weight 10) vs 47.1 %;
    # hat and lighting learned faster, pose, expression and glasses not (assets/base_tiny/README.md).
    c.data.counterfactual = ()
    c.train.pair_weight = 1.0
    c.train.ema_decay = 0.995  # a ~200-step horizon
    # True: decay min(ema_decay, (1 + n) / (10 + n)) after n updates, so early EMA weights are not mostly the random
    # init (off in the recorded runs: with 1200 steps the init's weight in the EMA is 0.995**1200 ≈ 0.2%).
    c.train.ema_warmup = False
    c.train.log_every = 100
    c.train.checkpoint_every = 200
    c.train.sample_every = 400  # 0 = no sample grids
    c.train.stop_at = 0  # > 0: stop (with a checkpoint) after this step, as on preemption; rerun to resume
    c.train.progress = True

    c.optimizer = common.optimizer(2e-3, warmup_steps=50, end_lr_ratio=0.05)

    c.sample = ml_collections.ConfigDict()
    c.sample.prompts = sample_prompts()
    c.sample.seeds_per_prompt = 4
    c.sample.num_inference_steps = 25
    c.sample.guidance_scale = 3.0

    c.export = ml_collections.ConfigDict()
    c.export.weights_dtype = "float32"

    if smoke:
        c.model.block_out_channels = (32, 32)
        c.model.attention_head_dim = 2
        c.model.text_hidden_size = 32
        c.model.text_layers = 1
        c.model.text_heads = 2
        c.data.synth_config = "smoke"
        c.data.num_threads = 1
        c.train.steps = 4
        c.train.batch_size = 4
        c.train.log_every = 2
        c.train.checkpoint_every = 2
        c.train.sample_every = 4
        c.train.progress = False
        c.optimizer.warmup_steps = 1
        c.sample.prompts = sample_prompts()[:2]
        c.sample.seeds_per_prompt = 2
        c.sample.num_inference_steps = 2
    return c
