"""Meta-LoRA on the procedural world: meta-train ``D`` over meta_train identities, adapt test identities.

    python -m experiments.meta_train --config configs/meta_lora_tiny.py --workdir runs/meta_tiny
    python -m experiments.adapt --config configs/meta_lora_tiny.py --workdir runs/meta_tiny \
        --config.adapt.identities="(0, 1, 2, 3)"
    python -m experiments.meta_train --config configs/meta_lora_tiny.py:smoke --workdir /tmp/smoke   # CI size
    python -m experiments.meta_train --config configs/meta_lora_tiny.py:lfw --workdir runs/meta_lfw   # real photos

Arguments: ``""`` (default), ``"lfw"`` (the real-photo track: LFW meta_train identities on the LFW base of
``configs/base_lfw.py`` at ``runs/base_lfw/base_model``) or ``"smoke"`` (random tiny base, a few steps, the ``smoke``
dataset).
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "smoke", "lfw"):
        raise ValueError(f"configs/meta_lora_tiny.py: unknown argument {arg!r}; use '', 'lfw' or 'smoke'")
    smoke = arg == "smoke"
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.base = ml_collections.ConfigDict()
    c.base.path = ""  # "" = the pretrained base shipped in assets/base_tiny; "random:<base config arg>" = untrained
    c.base.attention_backend = "auto"
    c.base.compute_dtype = "float32"  # the UNet's activations (parameters stay float32): float32 | bfloat16 | float16
    c.base.remat = False  # recompute UNet block activations in the backward pass (memory for time)

    c.lora = ml_collections.ConfigDict()
    c.lora.method = "meta_lora"  # "meta_lora" (D shared, M/U per subject) | "lora" (A/B per subject)
    c.lora.targets = "attn"
    c.lora.rank = 4  # r_d; the rank sweep (docs/results.md, ablation: ranks) does not separate 2 / 4 / 8
    c.lora.mid_rank = 16  # r_m; 4 vs 16: within the sweep's intervals, 16 a little ahead on R-FaceSim
    c.lora.alpha = 0.0  # 0 = scale 1

    c.meta = ml_collections.ConfigDict()
    c.meta.algorithm = "joint"  # joint | reptile | fomaml | maml
    # joint: head table rows (identity i uses row i % num_heads); 0 = one per meta-train identity (num_identities)
    c.meta.num_heads = 0
    c.meta.identities_per_step = 8
    # Meta-train on the first N identities of the split (0 = all 1000). Joint training only moves D once the heads'
    # Up factors (zero at init) have grown, so each head needs many visits: 400 steps × 8 identities visit each of
    # 1000 heads ~3 times (the first shipped D: gradient norm ~1e-3, a weak prior) and each of 100 heads ~32 times.
    c.meta.num_identities = 100
    c.meta.shots = 2  # support shots per identity
    c.meta.query_shots = 1  # (fo)maml only
    c.meta.inner_steps = 4  # reptile / (fo)maml inner loop
    c.meta.inner_learning_rate = 1e-2
    c.meta.inner_optimizer = "adam"

    c.data = ml_collections.ConfigDict()
    c.data.source = "synth"
    c.data.synth_config = "r32"
    c.data.folder_root = ""
    c.data.data_dir = ""
    c.data.split = "meta_train"
    c.data.flip_prob = 0.5
    c.data.pad_fraction = 0.0625
    c.data.num_threads = 2

    c.train = ml_collections.ConfigDict()
    c.train.steps = 400
    c.train.min_snr_gamma = 0.0  # the base's plain v-loss: min-SNR gives the noisy steps, where the identifier
    # token has to decide the face, almost no weight (see configs/base_tiny.py)
    c.train.log_every = 25
    c.train.checkpoint_every = 100
    c.train.stop_at = 0
    c.train.progress = True

    c.optimizer = common.optimizer(1e-3)

    c.adapt = ml_collections.ConfigDict()
    c.adapt.identities = (0, 1, 2, 3)  # indices into the test split's identities
    c.adapt.split = "test"
    c.adapt.shots = 1
    c.adapt.steps = 100
    c.adapt.learning_rate = 5e-3
    c.adapt.batch_size = 4
    c.adapt.meta_down = ""  # "" = <workdir>/meta_down (the output of meta_train); unused by the lora method
    c.adapt.num_inference_steps = 25
    c.adapt.guidance_scale = 3.0
    c.adapt.seeds_per_prompt = 2

    if arg == "lfw":
        c.base.path = "runs/base_lfw/base_model"
        c.data.source = "folders"  # folder_root "" = the LFW track
    if smoke:
        c.base.path = "random:smoke"
        c.lora.mid_rank = 4
        c.meta.num_heads = 16
        c.meta.identities_per_step = 2
        c.meta.inner_steps = 2
        c.data.synth_config = "smoke"
        c.data.num_threads = 1
        c.train.steps = 4
        c.train.log_every = 2
        c.train.checkpoint_every = 2
        c.train.progress = False
        c.optimizer.warmup_steps = 1
        c.adapt.identities = (0, 1)
        c.adapt.steps = 3
        c.adapt.batch_size = 1
        c.adapt.num_inference_steps = 2
        c.adapt.seeds_per_prompt = 1
    return c
