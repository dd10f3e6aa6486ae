"""Meta-LoRA on SDXL: meta-train ``D`` over identity folders, adapt held-out identities.

    python -m experiments.meta_train --config configs/meta_lora_sdxl.py --workdir runs/meta_sdxl \
        --config.base.path=/path/to/stable-diffusion-xl-base-1.0
    python -m experiments.adapt --config configs/meta_lora_sdxl.py --workdir runs/meta_sdxl \
        --config.base.path=/path/to/stable-diffusion-xl-base-1.0 --config.adapt.identities="(0, 1, 2, 3)"

``base.path`` is a diffusers ``StableDiffusionXLPipeline`` folder with safetensors weights (nothing is downloaded).
The same jobs, code path and settings as ``configs/meta_lora_sd15.py``; what SDXL adds is conditioning, handled by
the base model (``metalora.models.base_model.encode_prompt``): both text encoders' penultimate hidden states side by
side, the second encoder's pooled projection and the micro-conditioning size ids of an uncropped square photo at
the pipeline's 1024 px. Arguments: ``""`` (full scale) or ``"tiny"`` (the same settings at test size: a tiny SDXL
folder in ``base.path`` and the procedural world's ``smoke`` photos, as the tests run it).

Methods that learn a token embedding (textual inversion, AttnDreamBooth's first stage, the stacked-ID encoder) are
refused on SDXL: its prompt goes through two text encoders, so a new token would be two embeddings to learn.

Memory arithmetic of the joint algorithm's head table (SDXL, attention targets, r_d = 4, r_m = 16; counted with
``nnx.eval_shape`` on ``configs/sd_unets.py``'s SDXL UNet, 560 adapted projections): ``D`` has 3,143,680
parameters; one identity's head 10,685,440, i.e. 128 MB with its two Adam moments in float32, next to the 10.3 GB
float32 UNet (2,567,463,684 parameters). ``meta.num_heads = 16`` keeps a pool of 16 rows (2.05 GB; identity i trains
row i mod 16); one head per identity of a 1000-identity set would need 128 GB.
"""

import ml_collections

from configs import meta_lora_sd15


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "tiny"):
        raise ValueError(f"configs/meta_lora_sdxl.py: unknown argument {arg!r}; use '' or 'tiny'")
    c = meta_lora_sd15.get_config(arg)
    if arg == "":
        c.base.path = "checkpoints/stable-diffusion-xl-base-1.0"  # a local diffusers folder; override it
        c.meta.num_heads = 16  # a pool of heads (see the memory arithmetic above)
        c.meta.identities_per_step = 4  # 1024 px latents (128²): half SD-1.5's identities per step
    # SDXL predicts ε like SD-1.5: min-SNR-5 stays. Its pipeline's usual guidance is lower than SD-1.5's 7.5.
    c.adapt.guidance_scale = 5.0
    return c
