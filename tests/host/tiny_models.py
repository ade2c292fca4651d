"""A tiny, deterministic SD1.5-layout checkpoint that ComfyUI detects as SD15, made in code (no downloads).

ComfyUI fixes some sizes: SD15 detection wants model_channels 320 and context_dim 768, and the CLIP-L
text encoder is always built at full size (12 layers, 768 wide), so it must be complete. The UNet is
kept small through depth (2 levels, 1 res block each); the VAE is TAESD, which ComfyUI detects from its
keys and which is tiny. Must run inside a Python that imports ComfyUI."""

from __future__ import annotations

import torch

UNET_CONFIG = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    num_res_blocks=[1, 1],
    channel_mult=[1, 1],
    transformer_depth=[1, 0],
    transformer_depth_output=[1, 1, 0, 0],
    transformer_depth_middle=1,
    num_heads=8,
    num_head_channels=-1,
    context_dim=768,
    use_linear_in_transformer=False,
    use_spatial_transformer=True,
    legacy=False,
    adm_in_channels=None,
    use_checkpoint=False,
    use_temporal_resblock=False,
    use_temporal_attention=False,
)


# The real SD1.5 UNet (860M parameters): 4 levels of 2 res blocks, attention on the first three. For measurements
# at full size (benchmarks/comfy_train.py --size sd15); the tests use the tiny one.
SD15_UNET_CONFIG = dict(
    UNET_CONFIG,
    image_size=64,
    num_res_blocks=[2, 2, 2, 2],
    channel_mult=[1, 2, 4, 4],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
)


# Two res blocks per level (as SD1.x and SDXL have, so diffusers names map to these): the layout of the tiny
# pipeline tests/tiny_pipeline.py builds with comfy_tiny=True, for a file `waveft train` writes.
TWO_RES_UNET_CONFIG = dict(
    UNET_CONFIG, num_res_blocks=[2, 2], transformer_depth=[1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 0, 0, 0]
)


# The SDXL base UNet (2.6B parameters) as ComfyUI detects it from a UNet-only file: 3 levels, transformer depth 2 and
# 10, 2048-wide context, the 2816-wide pooled/size vector. For benchmarks/comfy_train.py --size sdxl only.
SDXL_UNET_CONFIG = dict(
    UNET_CONFIG,
    num_classes="sequential",
    adm_in_channels=2816,
    num_res_blocks=[2, 2, 2],
    channel_mult=[1, 2, 4],
    transformer_depth=[0, 0, 2, 2, 10, 10],
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    transformer_depth_middle=10,
    use_linear_in_transformer=True,
    context_dim=2048,
    num_heads=-1,
    num_head_channels=64,
)


def _randomize(module: torch.nn.Module, gen: torch.Generator, gain: float = 1.0, copy: bool = True) -> dict | None:
    """Fan-in scaled normal weights, unit norms; returns an fp32 state dict copy (None when not `copy`)."""
    with torch.no_grad():
        for mod in module.modules():
            w = getattr(mod, "weight", None)
            if not isinstance(w, torch.Tensor) or w.is_meta:
                continue
            if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                mod.weight.fill_(1.0)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, torch.nn.Embedding):
                mod.weight.copy_(torch.randn(w.shape, generator=gen) * 0.02)
            elif w.dim() >= 2:
                mod.weight.copy_(torch.randn(w.shape, generator=gen) * (gain / w[0].numel() ** 0.5))
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.02)
        if not copy:
            return None
        return {k: v.detach().float().clone() for k, v in module.state_dict().items()}


def _last_conv(sd: dict, prefix: str) -> tuple[str, str]:
    convs = [k for k in sd if k.startswith(prefix) and k.endswith(".weight") and sd[k].dim() == 4]
    last = max(convs, key=lambda k: int(k.split(".")[1]))
    return last, last[: -len("weight")] + "bias"


def make_checkpoint_state(seed: int = 1234, unet_config: dict = UNET_CONFIG) -> dict:
    """State dict of a whole SD1.5-layout checkpoint (fp16 weights), as a file on disk would hold: the tiny UNet,
    or another UNET_CONFIG-style layout (SD15_UNET_CONFIG)."""
    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    gen = torch.Generator().manual_seed(seed)
    unet = UNetModel(**unet_config, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    unet_sd = _randomize(unet, gen)
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    clip_sd = _randomize(clip.transformer, gen)
    taesd = comfy.taesd.taesd.TAESD()
    tae_sd = {k: v for k, v in _randomize(taesd, gen, gain=2**0.5).items() if k not in ("vae_scale", "vae_shift")}
    # Scale the decoder's last conv so that random latents decode to mid-grey +- 0.2 instead of saturating.
    tae_sd["vae_scale"] = torch.tensor(0.005)
    tae_sd["vae_shift"] = torch.tensor(0.0)
    with torch.no_grad():
        taesd.load_state_dict(tae_sd)
        out = taesd.taesd_decoder(torch.randn(4, 4, 8, 8, generator=gen) * 0.8)
        wk, bk = _last_conv(tae_sd, "taesd_decoder")
        mean, std = out.mean(dim=(0, 2, 3)), out.std(dim=(0, 2, 3))
        tae_sd[wk] *= (0.2 / std)[:, None, None, None]
        tae_sd[bk] = (tae_sd[bk] - mean) * (0.2 / std) + 0.5

    def half(sd):
        return {k: (v.half() if v.is_floating_point() and v.dim() > 0 else v).contiguous() for k, v in sd.items()}

    ckpt = {f"model.diffusion_model.{k}": v for k, v in half(unet_sd).items()}
    ckpt.update(
        {f"cond_stage_model.transformer.{k}": v for k, v in half(clip_sd).items() if k != "text_projection.weight"}
    )
    ckpt.update({f"first_stage_model.{k}": v for k, v in half(tae_sd).items()})
    return ckpt


def make_unet_state(seed: int = 1234, unet_config: dict = SDXL_UNET_CONFIG, dtype=torch.float16) -> dict:
    """A UNet-only state dict (what ComfyUI's Load Diffusion Model reads), built and randomized in `dtype`, so that
    a 2.6B-parameter UNet never needs its fp32 copy in memory."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**unet_config, dtype=dtype, device="cpu", operations=comfy.ops.disable_weight_init)
    _randomize(unet, torch.Generator().manual_seed(seed), copy=False)
    return {k: v.contiguous() for k, v in unet.state_dict().items()}
