"""Meta-LoRA on Stable Diffusion 1.5: meta-train ``D`` over identity folders, adapt held-out identities.

    python -m experiments.meta_train --config configs/meta_lora_sd15.py --workdir runs/meta_sd15 \
        --config.base.path=/path/to/stable-diffusion-v1-5
    python -m experiments.adapt --config configs/meta_lora_sd15.py --workdir runs/meta_sd15 \
        --config.base.path=/path/to/stable-diffusion-v1-5 --config.adapt.identities="(0, 1, 2, 3)"

``base.path`` is a diffusers ``StableDiffusionPipeline`` folder with safetensors weights (nothing is downloaded);
the photos are the LFW track's identity folders (``../shared/data/lfw``) or ``--config.data.folder_root``, read at
the pipeline's 512 px and VAE-encoded inside the step. The same jobs and code path as ``configs/meta_lora_tiny.py``;
only the sizes differ. Arguments: ``""`` (full scale) or ``"tiny"`` (the same settings at test size: a tiny SD
folder in ``base.path`` and the procedural world's ``smoke`` photos, as the tests run it).

SDXL: ``configs/meta_lora_sdxl.py`` (the same settings; the base model adds SDXL's conditioning).

Memory arithmetic of the joint algorithm's head table (SD-1.5, attention targets, r_d = 4, r_m = 16; counted with
``nnx.eval_shape`` on ``configs/sd_unets.py``'s SD-1.5 UNet): ``D`` has 397,824 parameters; one identity's head
(Mid + Up of 128 attention projections) 1,605,632, i.e. 19.3 MB with its two Adam moments in float32. One head per
identity would cost 19.3 GB for 1000 identities, so ``meta.num_heads`` keeps a pool of 64 rows (1.23 GB; identity i
trains row i mod 64) next to the 3.4 GB float32 UNet. ``benchmarks/compile_sd.py`` compiles these steps on 8
simulated devices and prints XLA's per-device memory.
"""

import ml_collections

from configs import meta_lora_tiny


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "tiny"):
        raise ValueError(f"configs/meta_lora_sd15.py: unknown argument {arg!r}; use '' or 'tiny'")
    c = meta_lora_tiny.get_config("")

    c.base.path = "checkpoints/stable-diffusion-v1-5"  # a local diffusers folder; override on the command line
    c.base.compute_dtype = "bfloat16"  # activations; parameters, optimiser state and D stay float32
    c.base.remat = True  # recompute each UNet block in the backward pass: 64×64 latents × batch do not fit otherwise

    c.lora.targets = "attn"
    c.lora.rank = 4  # r_d
    c.lora.mid_rank = 16  # r_m

    c.meta.algorithm = "joint"
    c.meta.num_heads = 64  # a pool of heads (see the memory arithmetic above)
    c.meta.num_identities = 0  # every meta_train identity of the folders
    c.meta.identities_per_step = 8
    c.meta.shots = 1
    c.meta.query_shots = 1
    c.meta.inner_steps = 4
    c.meta.inner_learning_rate = 1e-4

    c.data.source = "folders"
    c.data.folder_root = ""  # "" = the LFW track (../shared/data/lfw)
    c.data.pad_fraction = 0.0625

    c.train.steps = 2000
    # SD-1.5 predicts ε; min-SNR-5 is the usual weighting for fine-tuning it (the tiny world's base wanted 0).
    c.train.min_snr_gamma = 5.0
    c.train.log_every = 50
    c.train.checkpoint_every = 250

    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 1e-2

    c.adapt.shots = 1
    c.adapt.steps = 375  # the Meta-LoRA paper's step count for Meta-LoRA (plain LoRA: 625)
    c.adapt.learning_rate = 1e-4
    c.adapt.batch_size = 1
    c.adapt.guidance_scale = 7.5
    c.adapt.num_inference_steps = 25

    if arg == "tiny":
        c.base.path = ""  # the test sets a tiny StableDiffusionPipeline folder
        c.meta.num_heads = 4
        c.meta.num_identities = 8
        c.meta.identities_per_step = 2
        c.meta.inner_steps = 2
        c.data.source = "synth"
        c.data.synth_config = "smoke"
        c.data.num_threads = 1
        c.train.steps = 2
        c.train.log_every = 1
        c.train.checkpoint_every = 2
        c.train.progress = False
        c.optimizer.warmup_steps = 1
        c.adapt.identities = (0, 1)
        c.adapt.steps = 2
        c.adapt.num_inference_steps = 2
        c.adapt.seeds_per_prompt = 1
    return c
