"""Layer names: diffusers/PEFT spellings of SD1.x and SDXL <-> ComfyUI-native module paths.

ComfyUI-native names (FORMAT.md section 3) are the host's state-dict keys without '.weight':
`diffusion_model.<ldm module>` for the UNet and `text_encoders.clip_l|clip_g.transformer.<hf module>` for
the text encoders. Diffusers names the same UNet modules differently; both SD1.x and SDXL use two
ResNet blocks per level, so one rule converts either way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..keys import META_ARCHITECTURE, META_BASE_MODEL

UNET_PREFIX = "diffusion_model."
TE_PREFIX = "text_encoders."
ENCODERS = ("clip_l", "clip_g", "clip_h")  # ComfyUI's names of the CLIP text encoders, the usual order
# A native text-encoder module: text_encoders.<encoder>.transformer.<Hugging Face module path>
NATIVE_CLIP = re.compile(r"text_encoders\.(clip_[a-z0-9]+)\.transformer\.(.+)")


@dataclass(frozen=True)
class Family:
    """A base-model family under every name the tools give it."""

    tag: str  # ss_base_model_version this project writes, spelled so LoRA managers map it (README, metadata)
    architecture: str  # modelspec.architecture prefix this project writes
    comfy: tuple[str, ...]  # ComfyUI's model_config classes (exact names: Flux2 subclasses Flux)
    webui: str  # A1111/Forge SdVersion ('' for families the webuis do not run)
    tag_prefixes: tuple[str, ...]  # how tags start, ours and other tools' (sd_v1 is kohya's, sd_1.5 ai-toolkit's)
    architecture_prefixes: tuple[str, ...]  # how architectures start, ours and other tools'


# Tags: what kohya's sd-scripts, musubi-tuner or ai-toolkit write for the family, choosing the spelling that
# ComfyUI-Lora-Manager maps to a base model (it matches 'sd_1.5', 'sdxl', 'flux1' inside the tag) where one does.
FAMILIES = (
    Family("sd_1.5", "stable-diffusion-v1", ("SD15",), "SD1", ("sd_v1", "sd_1.5", "sd-v1"), ("stable-diffusion-v1",)),
    Family(
        "sd_v2",
        "stable-diffusion-v2",
        ("SD20", "SD21UnclipL", "SD21UnclipH"),
        "SD2",
        ("sd_v2", "sd_2", "sd-v2"),
        ("stable-diffusion-v2",),
    ),
    Family("sdxl_base_v1-0", "stable-diffusion-xl-v1-base", ("SDXL",), "SDXL", ("sdxl",), ("stable-diffusion-xl",)),
    Family("sd3", "stable-diffusion-3", ("SD3",), "SD3", ("sd3", "sd_3"), ("stable-diffusion-3",)),
    Family(
        "flux1",
        "flux-1-dev",
        ("Flux", "FluxSchnell", "FluxInpaint"),
        "Flux",
        ("flux1", "flux.1", "flux_1"),
        ("flux-1", "flux.1"),
    ),
    Family("flux2", "flux-2-dev", ("Flux2",), "", ("flux2", "flux.2"), ("flux-2", "flux.2")),
    Family("chroma", "chroma", ("Chroma",), "", ("chroma",), ("chroma",)),
    Family("lumina2", "lumina-2", ("Lumina2",), "", ("lumina2", "lumina_2"), ("lumina-2", "lumina2")),
    Family("zimage", "z-image", ("ZImage",), "", ("zimage", "z_image", "z-image"), ("z-image",)),
    Family("qwen_image", "qwen-image", ("QwenImage",), "", ("qwen_image", "qwen-image"), ("qwen-image",)),
    Family("hidream", "hidream-i1", ("HiDream",), "", ("hidream",), ("hidream",)),
    Family(
        "hunyuan_video", "hunyuan-video", ("HunyuanVideo",), "", ("hunyuan_video", "hunyuan-video"), ("hunyuan-video",)
    ),
    Family("wan_2.1", "wan2.1", ("WAN21_T2V", "WAN21_I2V"), "", ("wan_2.1", "wan2.1", "wan21"), ("wan2.1",)),
    Family("wan_2.2", "wan2.2", ("WAN22_T2V",), "", ("wan_2.2", "wan2.2", "wan22"), ("wan2.2",)),
    Family("ltxv", "ltx-video", ("LTXV",), "", ("ltxv", "ltx_video", "ltx-video"), ("ltx-video", "ltxv")),
    # Anima (ComfyUI 0.3x, a Cosmos-Predict2 DiT with an LLM adapter): tag and architecture as lora-scripts-next
    # writes them
    Family("anima", "anima-preview", ("Anima",), "", ("anima",), ("anima",)),
)


def family_of(metadata: dict) -> Family | None:
    """The family a file's metadata names (ss_base_model_version, else modelspec.architecture), if any."""
    tag = str(metadata.get(META_BASE_MODEL) or "").lower()
    arch = str(metadata.get(META_ARCHITECTURE) or "").lower()
    return next(
        (
            f
            for f in FAMILIES
            if (tag and tag.startswith(f.tag_prefixes)) or (arch and arch.startswith(f.architecture_prefixes))
        ),
        None,
    )


def family_tag_of_comfy(model_config_class: str) -> str:
    """ss_base_model_version for ComfyUI's detected model class ('' when this project has no tag for it)."""
    return next((f.tag for f in FAMILIES if model_config_class in f.comfy), "")


# diffusers ResNet sub-module -> LDM ResBlock sub-module
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_BACK = {v: k for k, v in _RESNET.items()}
_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_TOP_BACK = {v: k for k, v in _TOP.items()}

# Prefixes that pipelines and PEFT put before a component's module names.
COMPONENT_PREFIXES = ("base_model.model.", "unet.", "text_encoder_2.", "text_encoder.", "transformer.")
UNET_ROOTS = (
    "down_blocks.",
    "mid_block.",
    "up_blocks.",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding.",
    "add_embedding.",
)


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    mapped = _RESNET.get(head)
    if mapped is None:
        raise KeyError(rest)
    return mapped + ("." + tail if tail else "")


def diffusers_unet_to_ldm(name: str) -> str | None:
    """`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` -> `input_blocks.4.1.transformer_blocks...`.
    None when the name is not a diffusers SD1.x/SDXL UNet module, and for up-sampler convolutions, whose LDM
    index depends on whether the level has attention (SD1.x and SDXL differ; PEFT's WaveFT never targets them)."""
    for d, ldm in _TOP.items():
        if name == d or name.startswith(d + "."):
            return ldm + name[len(d) :]
    try:
        m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(attentions|resnets)\.(\d+)(?:\.(.+))?", name)
        if m:
            i, j = int(m[2]), int(m[4])
            # two ResNets per level: three input blocks per level (the third is the down-sampler) after
            # conv_in, and three output blocks per level
            block = f"input_blocks.{3 * i + j + 1}" if m[1] == "down" else f"output_blocks.{3 * i + j}"
            return _ldm_part(block, m[3], m[5])
        m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(\..+)?", name)
        if m:
            return f"input_blocks.{3 * (int(m[1]) + 1)}.0.op{m[2] or ''}"
        m = re.fullmatch(r"mid_block\.(attentions|resnets)\.(\d+)(?:\.(.+))?", name)
        if m:
            block = "middle_block.1" if m[1] == "attentions" else f"middle_block.{2 * int(m[2])}"
            return block + (("." + (m[3] if m[1] == "attentions" else _resnet(m[3]))) if m[3] else "")
    except KeyError:
        return None
    return None


def _ldm_part(block: str, kind: str, rest: str | None) -> str:
    if kind == "attentions":
        return f"{block}.1" + (f".{rest}" if rest else "")
    return f"{block}.0" + (f".{_resnet(rest)}" if rest else "")


def ldm_unet_to_diffusers(name: str) -> str | None:
    """Inverse of diffusers_unet_to_ldm. None when the name is not an SD1.x/SDXL LDM UNet module."""
    for ldm, d in _TOP_BACK.items():
        if name == ldm or name.startswith(ldm + "."):
            return d + name[len(ldm) :]
    try:
        m = re.fullmatch(r"input_blocks\.(\d+)\.(\d)(?:\.(.+))?", name)
        if m:
            k, part, rest = int(m[1]), int(m[2]), m[3]
            i, j = divmod(k - 1, 3)
            if j == 2:  # the level's downsampler
                return f"down_blocks.{i}.downsamplers.0.conv" + (rest[2:] if rest and rest.startswith("op") else "")
            if part == 1:
                return f"down_blocks.{i}.attentions.{j}" + (f".{rest}" if rest else "")
            return f"down_blocks.{i}.resnets.{j}" + (f".{_resnet_back(rest)}" if rest else "")
        m = re.fullmatch(r"middle_block\.(\d)(?:\.(.+))?", name)
        if m:
            part, rest = int(m[1]), m[2]
            if part == 1:
                return "mid_block.attentions.0" + (f".{rest}" if rest else "")
            return f"mid_block.resnets.{part // 2}" + (f".{_resnet_back(rest)}" if rest else "")
        m = re.fullmatch(r"output_blocks\.(\d+)\.(\d)(?:\.(.+))?", name)
        if m:
            k, part, rest = int(m[1]), int(m[2]), m[3]
            i, j = divmod(k, 3)
            if part == 0:
                return f"up_blocks.{i}.resnets.{j}" + (f".{_resnet_back(rest)}" if rest else "")
            if rest and (rest == "conv" or rest.startswith("conv.")):  # the level's upsampler
                return f"up_blocks.{i}.upsamplers.0.conv" + rest[4:]
            return f"up_blocks.{i}.attentions.{j}" + (f".{rest}" if rest else "")
    except KeyError:
        return None
    return None


def _resnet_back(rest: str) -> str:
    for ldm, d in _RESNET_BACK.items():
        if rest == ldm or rest.startswith(ldm + "."):
            return d + rest[len(ldm) :]
    raise KeyError(rest)


# transformers 5 dropped CLIPTextModel's `text_model` wrapper: its modules (and PEFT's names for them) start
# here. CLIPTextModelWithProjection kept the wrapper; ComfyUI and the checkpoints use the wrapped names.
_TEXT_MODEL_ROOTS = (
    "encoder.layers.",
    "embeddings.token_embedding",
    "embeddings.position_embedding",
    "final_layer_norm",
)
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


def hf_text_model_name(name: str) -> str:
    """A CLIP text model's module name in the transformers 4 form ComfyUI uses (`text_model.encoder.…`),
    whichever transformers generation wrote it."""
    return "text_model." + name if name.startswith(_TEXT_MODEL_ROOTS) else name


def split_component(name: str) -> tuple[str, str]:
    """('unet' | 'text_encoder' | 'text_encoder_2' | 'transformer' | '', name without component prefixes)."""
    component = ""
    changed = True
    while changed:
        changed = False
        for prefix in COMPONENT_PREFIXES:
            if name.startswith(prefix):
                if prefix != "base_model.model.":
                    component = prefix[:-1]
                name = name[len(prefix) :]
                changed = True
    if not component:
        if name.startswith(UNET_ROOTS):
            component = "unet"
        elif name.startswith("text_model.") or name.startswith(_TEXT_MODEL_ROOTS):
            component = "text_encoder"
    if component in TEXT_COMPONENTS:
        name = hf_text_model_name(name)
    return component, name


def to_native(name: str, clip: str | None = None) -> str:
    """A PEFT/diffusers module name -> ComfyUI-native. Names of models it does not recognise come back
    without their `base_model.model.` (or pipeline component) prefix.

    `clip` picks the text encoder ('clip_l', 'clip_g', ...) when the name alone cannot tell."""
    if name.startswith((UNET_PREFIX, TE_PREFIX)):
        return name
    component, bare = split_component(name)
    if component == "unet" or (not component and bare.startswith(UNET_ROOTS)):
        ldm = diffusers_unet_to_ldm(bare)
        if ldm is not None:
            return UNET_PREFIX + ldm
    if component in TEXT_COMPONENTS or bare.startswith("text_model."):
        which = clip or ("clip_g" if component == "text_encoder_2" else "clip_l")
        return f"{TE_PREFIX}{which}.transformer.{bare}"
    return bare


def to_peft(native: str) -> tuple[str, str]:
    """ComfyUI-native -> (component, PEFT module name): the inverse of to_native for SD1.x/SDXL."""
    if native.startswith(UNET_PREFIX):
        d = ldm_unet_to_diffusers(native[len(UNET_PREFIX) :])
        if d is not None:
            return "unet", d
        return "unet", native[len(UNET_PREFIX) :]
    m = re.fullmatch(r"text_encoders\.(clip_[a-z]+)\.transformer\.(.+)", native)
    if m:
        return ("text_encoder_2" if m[1] == "clip_g" else "text_encoder"), m[2]
    return "", native
