"""Tiny random Stable Diffusion (SD-1.x-like) and SDXL-like pipelines saved with diffusers' ``save_pretrained``:
the folders the pipeline parity tests and the latent-base tests load (torch, f32)."""

import json
import pathlib
import string

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16
SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                set_alpha_to_one=False, steps_offset=1)


def _tokenizer(folder: pathlib.Path, pad_token: str | None = None) -> CLIPTokenizer:
    """A tiny byte-level BPE CLIP tokenizer from a hand-written vocab/merges (SDXL's second one pads with '!')."""
    vocab = {}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase + "!,":
            vocab[c + suffix] = len(vocab)
    merges = ["p h", "ph o", "t o</w>", "pho to</w>", "s k", "sk s</w>", "o f</w>", "c a", "ca t</w>"]
    for merge in merges:
        vocab[merge.replace(" ", "")] = len(vocab)
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"model_max_length": MAX_LENGTH, **({"pad_token": pad_token} if pad_token else {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return CLIPTokenizer.from_pretrained(str(folder))


def _text_encoder(tokenizer, cls, *, hidden_size: int, hidden_act: str = "quick_gelu", projection_dim: int = 16):
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
                            hidden_act=hidden_act, projection_dim=projection_dim,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return cls(config).eval()


def _perturbed(model, scale: float):
    """Moves every parameter off its init (zero-init output convs, unit norms) so all of them matter."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def _vae():
    return _perturbed(AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
                                    sample_size=32), 0.05).eval()


def build_sd(folder: pathlib.Path, **schedule) -> StableDiffusionPipeline:
    """SD-1.x-like: 32×32 pixels, 16×16 latents, one CLIPTextModel, no safety checker."""
    torch.manual_seed(0)
    tokenizer = _tokenizer(folder.parent / f"{folder.name}-tokenizer")
    text_encoder = _text_encoder(tokenizer, CLIPTextModel, hidden_size=32)
    if not hasattr(text_encoder, "text_model"):
        # diffusers 0.42's clip_skip path calls text_encoder.text_model.final_layer_norm, a module transformers 5
        # folded into CLIPTextModel itself; an unregistered alias restores the attribute for the reference run.
        object.__setattr__(text_encoder, "text_model", text_encoder)
    unet = _perturbed(UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=16), 0.05).eval()
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**{**SCHEDULE, **schedule}), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe.to(torch.float32)


def build_sdxl(folder: pathlib.Path, **options) -> StableDiffusionXLPipeline:
    """SDXL-like: two encoders (the second with projection and gelu, padding with '!'), text_time conditioning."""
    torch.manual_seed(1)
    tokenizer = _tokenizer(folder.parent / f"{folder.name}-tokenizer")
    tokenizer_2 = _tokenizer(folder.parent / f"{folder.name}-tokenizer-2", pad_token="!")
    text_encoder = _text_encoder(tokenizer, CLIPTextModel, hidden_size=16)
    text_encoder_2 = _text_encoder(tokenizer_2, CLIPTextModelWithProjection, hidden_size=32, hidden_act="gelu",
                                   projection_dim=24)
    unet = _perturbed(UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=48, attention_head_dim=(2, 4),
        norm_num_groups=8, use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), sample_size=16), 0.05).eval()
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=DDIMScheduler(**SCHEDULE, timestep_spacing="trailing"),
                                     add_watermarker=False, **options)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe.to(torch.float32)
