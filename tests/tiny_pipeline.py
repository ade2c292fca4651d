"""Tiny diffusers pipeline folders made in code (no download): the UNet, VAE, scheduler, CLIP text encoder(s) and a
character-level CLIP tokenizer whose vocabulary is written here. SD1-like (one encoder) or SDXL-like (two, with
the pooled projection and size ids). Two ResNets per level, as SD1.x and SDXL have, so layer names map to
ComfyUI's the usual way. Also a folder of training images with captions."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

MAX_TOKENS = 16


def write_tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + ",.'")
    vocab = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)
    tok.save_pretrained(folder)


def _clip(vocab_size: int, width: int, projection: bool):
    import transformers

    config = transformers.CLIPTextConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=width,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


def make_pipeline(folder, xl: bool = False, seed: int = 0, comfy_tiny: bool = False) -> Path:
    """`comfy_tiny`: the UNet of tests/host/tiny_models.py's TWO_RES_UNET_CONFIG in diffusers' layout (320 wide,
    CLIP 768), so what trains here applies to that ComfyUI model."""
    import diffusers

    folder = Path(folder)
    torch.manual_seed(seed)
    cross = 768 if comfy_tiny else (64 if xl else 32)
    unet_kw = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 320) if comfy_tiny else (32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross,
        attention_head_dim=8,
    )
    if xl:
        unet_kw.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
            use_linear_projection=True,
        )
    diffusers.UNet2DConditionModel(**unet_kw).save_pretrained(folder / "unet")
    diffusers.AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).save_pretrained(folder / "vae")
    diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    ).save_pretrained(folder / "scheduler")
    write_tokenizer(folder / "tokenizer")
    from transformers import CLIPTokenizer

    vocab = len(CLIPTokenizer.from_pretrained(folder / "tokenizer"))
    _clip(vocab, 768 if comfy_tiny else 32, False).save_pretrained(folder / "text_encoder")
    index = {
        "_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    if xl:
        write_tokenizer(folder / "tokenizer_2")
        _clip(vocab, 32, True).save_pretrained(folder / "text_encoder_2")
        index.update(
            text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
            tokenizer_2=["transformers", "CLIPTokenizer"],
        )
    (folder / "model_index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    return folder


def make_images(folder, count: int = 4, size: int = 24, seed: int = 0) -> Path:
    """`count` small RGB images with .txt captions (one left without, to use the default caption)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        pixels = (torch.rand(size, size + 4 * i, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        if i < count - 1:
            (folder / f"img{i}.txt").write_text(f"a photo of sks toy, number {i}", encoding="utf-8")
    return folder


if __name__ == "__main__":  # for tests that run in a Python without diffusers (the ComfyUI hosts' venvs)
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--comfy-tiny", action="store_true")
    ap.add_argument("--xl", action="store_true")
    a = ap.parse_args()
    make_pipeline(Path(a.folder) / "pipe", xl=a.xl, comfy_tiny=a.comfy_tiny)
    make_images(Path(a.folder) / "data")
