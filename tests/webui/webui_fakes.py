"""The pieces the webui tests share: tiny models with each webui's attribute layout, WaveFT files to load into
them, a clone of the extension as a webui makes it, and readers of single functions or values of a webui's source.
"""

from __future__ import annotations

from pathlib import Path

import torch

import waveft_core as wft

ROOT = Path(__file__).resolve().parents[2]  # the repository (tests/conftest.py puts it on sys.path)

WAVELET = "db2"  # a 4-tap filter: the deltas are not the Haar special case
TOL = 1e-6


def rel_err(a, b) -> float:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def make_layer(shape, p, seed, scaling=2.5):
    g = torch.Generator().manual_seed(seed)
    m, n = shape[0], int(torch.tensor(shape[1:]).prod())
    idx = torch.randperm(m * n, generator=g)[:p]
    return wft.Layer(
        spectrum=torch.randn(p, generator=g), indices=idx, shape=tuple(shape), scaling=scaling, wavelet=WAVELET
    )


def save_adapter(path, layers: dict, base: str):
    wft.save(wft.Adapter(layers=layers, metadata={"ss_base_model_version": base}), path)
    return wft.load(path)  # the reference: what the file holds


def put(root: torch.nn.Module, path: str, module: torch.nn.Module):
    node = root
    parts = path.split(".")
    for part in parts[:-1]:
        child = node._modules.get(part)
        if child is None:
            child = torch.nn.Module()
            node.add_module(part, child)
        node = child
    node.add_module(parts[-1], module)
    return module


def get(root, path):
    for part in path.split("."):
        root = root._modules[part]
    return root


def zero_(model):
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


# Layers of the test files: native name -> (shape, model path in the fake A1111 model)
UNET_Q = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"
UNET_CONV = "diffusion_model.input_blocks.0.0"
UNET_K2 = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k"
CLIP_L_Q = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
CLIP_L_FC1 = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1"
CLIP_L_EMB = "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding"
CLIP_G = "text_encoders.clip_g.transformer.text_model.encoder.layers.1."
CLIP_G_Q, CLIP_G_V, CLIP_G_FC2 = CLIP_G + "self_attn.q_proj", CLIP_G + "self_attn.v_proj", CLIP_G + "mlp.fc2"
CLIP_G_PROJ = "text_encoders.clip_g.transformer.text_projection"
D_G = 48  # CLIP-G width of the fake model


def sd1_layers():
    return {
        UNET_Q: make_layer((32, 32), 200, 1),
        UNET_CONV: make_layer((32, 4, 3, 3), 150, 2, scaling=7.0),  # a per-layer scaling
        CLIP_L_Q: make_layer((64, 64), 300, 3),
        CLIP_L_FC1: make_layer((128, 64), 300, 4),
        CLIP_L_EMB: make_layer((100, 64), 50, 5),  # A1111 never patches embeddings: skipped with a message
    }


def sdxl_layers():
    return {
        UNET_K2: make_layer((32, 40), 200, 11),
        CLIP_L_Q: make_layer((64, 64), 300, 12),
        CLIP_G_Q: make_layer((D_G, D_G), 300, 13),
        CLIP_G_V: make_layer((D_G, D_G), 300, 14, scaling=4.0),
        CLIP_G_FC2: make_layer((D_G, 4 * D_G), 300, 15),
        CLIP_G_PROJ: make_layer((D_G, D_G), 40, 16),  # a bare Parameter in OpenCLIP: skipped in A1111
    }


def a1111_sd1_model():
    m = torch.nn.Module()
    m.is_sdxl, m.is_sd2 = False, False
    put(m, "model." + UNET_Q, torch.nn.Linear(32, 32, bias=False))
    put(m, "model." + UNET_CONV, torch.nn.Conv2d(4, 32, 3, padding=1))
    te = "cond_stage_model.wrapped.transformer.text_model."
    put(m, te + "encoder.layers.0.self_attn.q_proj", torch.nn.Linear(64, 64))
    put(m, te + "encoder.layers.0.mlp.fc1", torch.nn.Linear(64, 128))
    put(m, te + "embeddings.token_embedding", torch.nn.Embedding(100, 64))
    return zero_(m)


def a1111_sdxl_model():
    m = torch.nn.Module()
    m.is_sdxl, m.is_sd2 = True, False
    put(m, "model." + UNET_K2, torch.nn.Linear(40, 32, bias=False))
    e0, e1 = torch.nn.Module(), torch.nn.Module()
    put(e0, "wrapped.transformer.text_model.encoder.layers.0.self_attn.q_proj", torch.nn.Linear(64, 64))
    blk = "wrapped.model.transformer.resblocks.1."
    put(e1, blk + "attn", torch.nn.MultiheadAttention(D_G, 4))
    put(e1, blk + "mlp.c_fc", torch.nn.Linear(D_G, 4 * D_G))
    put(e1, blk + "mlp.c_proj", torch.nn.Linear(4 * D_G, D_G))
    e1.wrapped.model.text_projection = torch.nn.Parameter(torch.zeros(D_G, D_G))
    put(m, "conditioner.embedders", torch.nn.ModuleList([e0, e1]))
    return zero_(m)


def a1111_mapping(model) -> dict:
    """A1111's naming rule (networks.assign_network_names_to_compvis_modules), for the tests without a checkout."""
    out = {}
    if model.is_sdxl:
        for i, emb in enumerate(model.conditioner.embedders):
            out.update({f"{i}_{n.replace('.', '_')}": mod for n, mod in emb.wrapped.named_modules()})
    else:
        out.update({n.replace(".", "_"): mod for n, mod in model.cond_stage_model.wrapped.named_modules()})
    out.update({n.replace(".", "_"): mod for n, mod in model.model.named_modules()})
    return out


def fake_clone(tmp_path):
    """A repo clone as A1111 makes it: the root files in place, a1111/ and waveft_core/ beside them."""
    ext = tmp_path / "extensions" / "ComfyUI-WaveFT"
    (ext / "scripts").mkdir(parents=True)
    (ext / "scripts" / "waveft_webui.py").write_text((ROOT / "scripts" / "waveft_webui.py").read_text())
    (ext / "install.py").write_text((ROOT / "install.py").read_text())
    (ext / "requirements.txt").write_text((ROOT / "requirements.txt").read_text())
    for name in ("a1111", "waveft_core"):
        (ext / name).symlink_to(ROOT / name, target_is_directory=True)
    return ext


def host_function(source: Path, name: str, namespace: dict):
    """One function of a host module, compiled from the host's own source, for modules too heavy to import whole
    (modules/sd_models.py loads every model class): the real code of that function, nothing else."""
    import ast

    tree = ast.parse(source.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    scope = dict(namespace)
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(source), "exec"), scope)
    return scope[name]


def host_value(source: Path, name: str, namespace: dict):
    """A module-level constant of a host module (e.g. a compiled regex), evaluated from the host's own source."""
    import ast

    tree = ast.parse(source.read_text(encoding="utf-8"))
    node = next(
        n
        for n in tree.body
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in n.targets)
    )
    return eval(compile(ast.Expression(node.value), str(source), "eval"), dict(namespace))


# The shape of SDXL's UNet, for the hosts' key maps (their diffusers <-> LDM name tables); the fake models hold
# only the layers under test.
SDXL_UNET_CONFIG = dict(
    num_res_blocks=[2, 2, 2],
    channel_mult=[1, 2, 4],
    transformer_depth=[0, 0, 2, 2, 10, 10],
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    transformer_depth_middle=10,
)


def plain_xl_delta(_root, strength):
    """What the ordinary LoRA of write_files adds: strength * alpha / rank * up @ down."""
    g = torch.Generator().manual_seed(5)
    up, down = torch.randn(32, 4, generator=g), torch.randn(4, 40, generator=g)
    return strength * 2.0 / 4 * (up @ down)


class ForgeObjects:
    def __init__(self, unet, clip):
        self.unet, self.clip = unet, clip

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip)
