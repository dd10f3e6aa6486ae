"""Base model of the real-photo track: the same script and model code on LFW identity folders at 32 px.

    python -m experiments.pretrain_base --config configs/base_lfw.py --workdir runs/base_lfw

Real photos carry no attribute captions, so every caption is the class-word prompt "a photo of a person" (the
identity folders' default); 10% are dropped to the empty prompt for classifier-free guidance as in the world.
"""

import ml_collections

from configs import base_tiny
from metalora.data import world


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "smoke"):
        raise ValueError(f"configs/base_lfw.py: unknown argument {arg!r}; use '' or 'smoke'")
    c = base_tiny.get_config(arg)
    c.data.source = "folders"
    c.data.folder_root = ""  # the LFW track (metalora.data.folders.default_lfw_root)
    c.data.flip_prob = 0.5
    c.data.pad_fraction = 0.0625  # real faces are not centred the same way; small shifts help
    c.sample.prompts = [world.make_caption({})] * 2
    c.sample.seeds_per_prompt = 8
    if arg:
        c.sample.seeds_per_prompt = 2
    return c
