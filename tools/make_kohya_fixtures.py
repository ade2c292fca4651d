"""Write tests/fixtures/kohya/: WaveFT files saved by lora-scripts-next's own network module, unmodified.

    python tools/make_kohya_fixtures.py <their vendor/sd-scripts folder> <out folder> <their commit>

Their module (`networks/waveft_anima.py`, a kohya sd-scripts network) is imported at run time from the
folder given on the command line; nothing of theirs is copied into this project. It needs their `library`
package importable (torchvision, diffusers, opencv, toml, imagesize, accelerate: their own requirements).

A tiny stand-in for the Anima DiT (one `Block` with the module paths and class names of ComfyUI's
comfy/ldm/cosmos/predict2.py, so its names are the ones ComfyUI's Anima key map knows) and a tiny Qwen3-like
text encoder (their `lora_te_*` names) are adapted by their `create_network`, given random spectra, and saved
by their `save_weights` in float32, float16 and bfloat16, with the metadata their trainer (train_network.py)
passes. Their `create_network_from_weights` + `merge_to` then merge each file into the base; the merged
weights are written next to it (`<name>.their_merge.safetensors`), or the error their merge raised is recorded
in manifest.json. Their `convert_anima_lora_to_comfy.py` turns the float32 file into ComfyUI names.

The MLP is 4099 wide so that many positions lie above 2048: float16 keeps integers exact only up to 2048,
bfloat16 only up to 256, so those saves lose positions exactly as their trainer does on real-size layers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

X_DIM, CONTEXT_DIM, MLP_DIM = 6, 7, 4099  # MLP_DIM: odd, and twice float16's exact-integer range
TE_HIDDEN, TE_INTERMEDIATE = 6, 9
N_FREQUENCY = 30


class Attention(nn.Module):  # comfy/ldm/cosmos/predict2.py Attention: q/k/v/output_proj, no bias
    def __init__(self, query_dim, context_dim):
        super().__init__()
        self.q_proj = nn.Linear(query_dim, query_dim, bias=False)
        self.k_proj = nn.Linear(context_dim, query_dim, bias=False)
        self.v_proj = nn.Linear(context_dim, query_dim, bias=False)
        self.output_proj = nn.Linear(query_dim, query_dim, bias=False)


class GPT2FeedForward(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.layer1 = nn.Linear(d_model, d_ff, bias=False)
        self.layer2 = nn.Linear(d_ff, d_model, bias=False)


class Block(nn.Module):  # the class name their module targets
    def __init__(self):
        super().__init__()
        self.self_attn = Attention(X_DIM, X_DIM)
        self.cross_attn = Attention(X_DIM, CONTEXT_DIM)
        self.mlp = GPT2FeedForward(X_DIM, MLP_DIM)


class TinyAnimaDiT(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block()])


class Qwen3Attention(nn.Module):
    def __init__(self):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, nn.Linear(TE_HIDDEN, TE_HIDDEN, bias=False))


class Qwen3MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(TE_HIDDEN, TE_INTERMEDIATE, bias=False)
        self.up_proj = nn.Linear(TE_HIDDEN, TE_INTERMEDIATE, bias=False)
        self.down_proj = nn.Linear(TE_INTERMEDIATE, TE_HIDDEN, bias=False)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Qwen3Attention()
        self.mlp = Qwen3MLP()


class TinyQwen3(nn.Module):  # their trainer adapts Qwen3ForCausalLM(...).model: names start at `layers.`
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Layer()])


def base_models(seed: int = 0):
    torch.manual_seed(seed)
    unet, te = TinyAnimaDiT(), TinyQwen3()
    for p in list(unet.parameters()) + list(te.parameters()):
        nn.init.normal_(p, std=0.05)
    return unet, te


def base_state(unet, te) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v.detach().clone().contiguous() for k, v in unet.state_dict().items()}
    out.update({f"te.{k}": v.detach().clone().contiguous() for k, v in te.state_dict().items()})
    return out


# (file stem, save dtype, network_args as the GUI passes them: strings)
CASES = [
    ("kohya_anima_fp32", torch.float32, {"waveft_use_idwt": "true"}),
    (
        "kohya_anima_fp32_noidwt",
        torch.float32,
        {"waveft_use_idwt": "false", "waveft_random_loc_seed": "1234", "waveft_scaling": "12.5"},
    ),
    ("kohya_anima_fp16", torch.float16, {"waveft_use_idwt": "true"}),
    ("kohya_anima_bf16", torch.bfloat16, {"waveft_use_idwt": "true"}),
]


def trainer_metadata(args: dict) -> dict[str, str]:
    """The keys their train_network.py / anima_train_network.py write that a reader looks at."""
    return {
        "ss_network_module": "networks.waveft_anima",
        "ss_network_dim": str(N_FREQUENCY),
        "ss_network_alpha": "1.0",
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": "anima",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "anima-preview/lora",
        "modelspec.title": "tiny anima waveft fixture",
    }


def main(sd_scripts: str, out: str, commit: str) -> None:
    sys.path.insert(0, sd_scripts)
    from networks import waveft_anima  # their module, unmodified
    from safetensors.torch import save_file

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    unet, te = base_models()
    base = base_state(unet, te)
    save_file(base, str(out_dir / "kohya_anima_base.safetensors"))
    manifest = {"their_repository": "github.com/storyAura/lora-scripts-next", "their_commit": commit, "cases": {}}
    for stem, dtype, args in CASES:
        unet, te = base_models()
        kwargs = dict(args, waveft_n_frequency=str(N_FREQUENCY))
        network = waveft_anima.create_network(1.0, N_FREQUENCY, 1.0, None, [te], unet, **kwargs)
        gen = torch.Generator().manual_seed(len(stem))
        for lora in network.text_encoder_loras + network.unet_loras:
            lora.waveft_spectrum.data = torch.randn(lora.waveft_spectrum.shape, generator=gen) * 0.02
        network.apply_to([te], unet, True, True)
        path = out_dir / f"{stem}.safetensors"
        network.save_weights(str(path), dtype, trainer_metadata(kwargs))
        case = {"save_precision": str(dtype).removeprefix("torch."), "network_args": kwargs}
        # their own merge, into a fresh copy of the base
        unet, te = base_models()
        try:
            merged_net, state = waveft_anima.create_network_from_weights(1.0, str(path), None, [te], unet)
            merged_net.merge_to([te], unet, state, dtype=torch.float32, device="cpu")
            save_file(base_state(unet, te), str(out_dir / f"{stem}.their_merge.safetensors"))
            case["their_merge"] = f"{stem}.their_merge.safetensors"
        except Exception as e:  # recorded: their bfloat16 reload fails
            case["their_merge_error"] = f"{type(e).__name__}: {e}"
        manifest["cases"][stem] = case
    converted = out_dir / "kohya_anima_fp32_comfy.safetensors"
    subprocess.run(
        [
            sys.executable,
            str(Path(sd_scripts) / "networks" / "convert_anima_lora_to_comfy.py"),
            str(out_dir / "kohya_anima_fp32.safetensors"),
            str(converted),
        ],
        check=True,
        cwd=sd_scripts,
        env={"PYTHONPATH": sd_scripts, "PATH": "/usr/bin:/bin"},
    )
    manifest["converted"] = {
        "kohya_anima_fp32_comfy.safetensors": "convert_anima_lora_to_comfy.py "
        "kohya_anima_fp32.safetensors kohya_anima_fp32_comfy.safetensors"
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
