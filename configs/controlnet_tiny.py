"""The procedural world's ControlNet (landmarks, shading and inpainting control), the MegaPortrait pipeline's.

    python -m experiments.train_controlnet --config configs/controlnet_tiny.py --workdir runs/controlnet
    python -m experiments.train_controlnet --config configs/controlnet_tiny.py:smoke --workdir /tmp/cn_smoke  # CI

Initialised from the base UNet's encoder (zero convolutions: a no-op at step 0); base and text encoder frozen.
Arguments: ``""`` or ``"smoke"`` (random tiny base, a few steps, the ``smoke`` dataset).
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "smoke"):
        raise ValueError(f"configs/controlnet_tiny.py: unknown argument {arg!r}; use '' or 'smoke'")
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.base = ml_collections.ConfigDict()
    c.base.path = ""  # "" = assets/base_tiny
    c.base.attention_backend = "auto"

    c.controlnet = ml_collections.ConfigDict()
    # One entry: the control image stays at the sample's 32 px (the model is pixel-space; SD's ControlNets use four
    # to reach the 8× smaller latents).
    c.controlnet.embedding_channels = (32,)

    c.data = ml_collections.ConfigDict()
    c.data.source = "synth"  # the control images are drawn from the world's ground truth
    c.data.synth_config = "r32"
    c.data.folder_root = ""
    c.data.data_dir = ""
    c.data.split = "meta_train"
    c.data.flip_prob = 0.5

    c.train = ml_collections.ConfigDict()
    # Measured (benchmarks/megaportrait.py's held-out control losses): 600 steps with 10% caption dropout left the
    # landmarks nearly unused (template loss 0.1054 → 0.1044 with them); hence longer and ControlNet's 50% dropout.
    c.train.steps = 1500
    c.train.batch_size = 32
    # Caption → empty prompt (control kept), half the time as in the ControlNet paper: with the caption the pose is
    # already known, so without dropping it the net has little reason to read the landmarks. Also keeps guidance.
    c.train.cond_drop_prob = 0.5
    c.train.group_keep_prob = 0.5  # each control group is shown with this probability, independently
    c.train.min_snr_gamma = 0.0  # the base's plain v-loss
    c.train.log_every = 50
    c.train.checkpoint_every = 200
    c.train.stop_at = 0
    c.train.progress = True

    c.optimizer = common.optimizer(1e-3)

    if arg == "smoke":
        c.base.path = "random:smoke"
        c.data.synth_config = "smoke"
        c.train.steps = 4
        c.train.batch_size = 4
        c.train.log_every = 2
        c.train.checkpoint_every = 2
        c.train.progress = False
        c.optimizer.warmup_steps = 1
    return c
