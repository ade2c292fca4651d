"""The shipped workflows: written from compact API-form specs, and turned back into the API form.

    python tools/workflows.py http://127.0.0.1:8188     # (re)write workflows/*.json from a running ComfyUI

ComfyUI's UI format keeps widget values as a positional list whose order follows the node's inputs
(`input_order` in /object_info), with an extra 'control after generate' entry after seed widgets; links
are listed separately. Which inputs are widgets depends on the host: ComfyUI 0.23 made
MakeTrainingDataset's `texts` a socket-only input, for one. So the generator takes every input's kind from
the /object_info of the host it writes for, and records that host's version in `extra.waveft`; run it against
the newest ComfyUI the pack supports. Reading a workflow back follows the frontend: values are assigned in
order, and a widget left without one (the last ones, e.g. one that an older host still shows as a widget)
keeps its default or takes its link. Both directions below follow those rules, so the tests can run every
shipped workflow headless through the API on every supported host."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UI_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
ROOT = Path(__file__).resolve().parent.parent


def _keys():
    """waveft_core/keys.py (the paper's defaults), read without importing waveft_core, which needs torch: this
    script runs with any Python."""
    spec = importlib.util.spec_from_file_location("_waveft_keys", ROOT / "waveft_core" / "keys.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


keys = _keys()


def _inputs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of a node's inputs in the order the UI lays out widgets."""
    order = info.get("input_order") or {k: list(info["input"].get(k, {})) for k in ("required", "optional")}
    out = []
    for group in ("required", "optional"):
        specs = info["input"].get(group, {})
        for name in order.get(group, []):
            if name in specs:
                out.append((name, specs[name]))
    return out


def _is_widget(spec) -> bool:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def _has_control(name: str, spec) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed"))


def _fits(spec, value) -> bool:
    """Whether a widget value has the kind its input takes: a value shifted onto another widget rarely does."""
    kind = spec[0]
    if isinstance(kind, list) or kind == "COMBO":
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    if kind == "INT":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "FLOAT":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "BOOLEAN":
        return isinstance(value, bool)
    if kind == "STRING":
        return isinstance(value, str)
    return True


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The API form ('POST /prompt') of a UI-format workflow. Raises KeyError/ValueError naming the node
    when a node type or input does not exist or the widget values do not fit."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        kind = node["type"]
        if kind in UI_ONLY or node.get("mode", 0) == 4:  # notes; bypassed nodes
            continue
        if kind not in object_info:
            raise KeyError(f"node {node['id']}: type {kind!r} does not exist in this ComfyUI")
        info = object_info[kind]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        known = set()
        for name, spec in _inputs(info):
            known.add(name)
            if _is_widget(spec):
                if values:
                    value = values.pop(0)
                    if not _fits(spec, value):
                        raise ValueError(
                            f"node {node['id']} ({kind}): widget value {value!r} does not fit input "
                            f"{name!r} ({spec[0] if isinstance(spec[0], str) else 'COMBO'}): "
                            "the widget values are shifted against this ComfyUI's inputs"
                        )
                    if (
                        _has_control(name, spec)
                        and values
                        and values[0] in ("fixed", "increment", "decrement", "randomize")
                    ):
                        values.pop(0)
                    if name not in linked:
                        inputs[name] = value
                elif name not in linked:  # the frontend leaves a widget without a value at its default
                    default = spec[1].get("default") if len(spec) > 1 and isinstance(spec[1], dict) else None
                    if default is not None:
                        inputs[name] = default
                    elif name in info["input"].get("required", {}):
                        raise ValueError(f"node {node['id']} ({kind}): no widget value for {name!r}")
            if name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
        unknown = set(linked) - known
        if unknown:
            raise KeyError(f"node {node['id']} ({kind}): no input named {sorted(unknown)}")
        if values:
            raise ValueError(f"node {node['id']} ({kind}): {len(values)} widget value(s) left over")
        api[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return api


def api_to_ui(api: dict, object_info: dict, notes: list[tuple[str, tuple]] = (), made_for: str = "") -> dict:
    """A UI-format workflow laid out in columns by depth, from an API-form graph; `made_for` is the version of
    the ComfyUI whose /object_info this is, recorded in `extra.waveft.made_for_comfyui`."""
    depth = {}

    def node_depth(nid):
        if nid not in depth:
            srcs = [
                v[0]
                for v in api[nid]["inputs"].values()
                if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
            ]
            depth[nid] = 1 + max((node_depth(s) for s in srcs), default=-1)
        return depth[nid]

    for nid in api:
        node_depth(nid)
    rows: dict = {}
    links, nodes = [], []
    out_links: dict = {}
    for nid, spec in api.items():
        for name, value in spec["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                link_id = len(links) + 1
                src_type = object_info[api[value[0]]["class_type"]]["output"][value[1]]
                links.append([link_id, int(value[0]), value[1], int(nid), name, src_type])
                out_links.setdefault((value[0], value[1]), []).append(link_id)
    for order, (nid, spec) in enumerate(sorted(api.items(), key=lambda kv: (depth[kv[0]], int(kv[0])))):
        info = object_info[spec["class_type"]]
        col = depth[nid]
        row = rows.get(col, 0)
        rows[col] = row + 1
        inputs, widgets = [], []
        for name, ispec in _inputs(info):
            value = spec["inputs"].get(name)
            is_link = isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            if _is_widget(ispec):
                opts = ispec[1] if len(ispec) > 1 and isinstance(ispec[1], dict) else {}
                default = opts.get("default")
                if default is None and ispec[0] in ("INT", "FLOAT", "STRING"):  # the frontend's empty widget
                    default = "" if ispec[0] == "STRING" else opts.get("min", 0)
                widgets.append(default if is_link or value is None else value)
                if _has_control(name, ispec):
                    widgets.append("fixed")
            if is_link:
                link_id = next(link[0] for link in links if link[3] == int(nid) and link[4] == name)
                entry = {"name": name, "type": ispec[0] if isinstance(ispec[0], str) else "COMBO", "link": link_id}
                if _is_widget(ispec):
                    entry["widget"] = {"name": name}
                inputs.append(entry)
        outputs = []
        for slot, (otype, oname) in enumerate(zip(info["output"], info.get("output_name", info["output"]))):
            outputs.append({"name": oname, "type": otype, "links": out_links.get((nid, slot), []), "slot_index": slot})
        nodes.append(
            {
                "id": int(nid),
                "type": spec["class_type"],
                "pos": [40 + 450 * col, 40 + 300 * row],
                "size": [320, 120],
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": inputs,
                "outputs": outputs,
                "properties": {"Node name for S&R": spec["class_type"]},
                "widgets_values": widgets,
                **({"title": spec["title"]} if "title" in spec else {}),
            }
        )
    next_id = max(int(n) for n in api) + 1
    below = max(n["pos"][1] for n in nodes) + 320  # notes go under the graph, where nothing overlaps them
    for i, (text, _) in enumerate(notes):
        nodes.append(
            {
                "id": next_id + i,
                "type": "Note",
                "pos": [40 + 460 * i, below],
                "size": [420, 160],
                "flags": {},
                "order": len(nodes),
                "mode": 0,
                "inputs": [],
                "outputs": [],
                "properties": {},
                "widgets_values": [text],
            }
        )
    for link in links:  # the UI stores the target slot index, not the name
        target = next(n for n in nodes if n["id"] == link[3])
        link[4] = next(i for i, entry in enumerate(target["inputs"]) if entry["name"] == link[4])
    return {
        "last_node_id": max(n["id"] for n in nodes),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {
            "ds": {"scale": 0.8, "offset": [0, 0]},
            **({"waveft": {"made_for_comfyui": made_for}} if made_for else {}),
        },
        "version": 0.4,
    }


# --- the shipped workflows -----------------------------------------------------------------------

CKPT = "v1-5-pruned-emaonly.safetensors"
ADAPTER = "my_waveft.safetensors"


def _txt2img(model, clip, vae, first_id: int, prompt: str, seed: int = 42, prefix="WaveFT", loader_ids=None):
    i = first_id
    return {
        str(i): {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": clip}},
        str(i + 1): {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": clip}},
        str(i + 2): {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        str(i + 3): {
            "class_type": "KSampler",
            "inputs": {
                "model": model,
                "seed": seed,
                "steps": 25,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": [str(i), 0],
                "negative": [str(i + 1), 0],
                "latent_image": [str(i + 2), 0],
                "denoise": 1.0,
            },
        },
        str(i + 4): {"class_type": "VAEDecode", "inputs": {"samples": [str(i + 3), 0], "vae": vae}},
        str(i + 5): {"class_type": "SaveImage", "inputs": {"images": [str(i + 4), 0], "filename_prefix": prefix}},
    }


def specs(object_info: dict | None = None) -> dict:
    """name -> (api graph, notes). `object_info` places links to outputs that moved between hosts: ComfyUI 0.8's
    Train LoRA node outputs a MODEL before its LORA_MODEL, 0.33's does not."""
    out = {}
    train_outputs = (object_info or {}).get("TrainLoraNode", {}).get("output", ["LORA_MODEL"])
    lora_slot = train_outputs.index("LORA_MODEL") if "LORA_MODEL" in train_outputs else 0
    ckpt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}}}

    g = dict(ckpt)
    g["2"] = {
        "class_type": "WaveFTLoader",
        "inputs": {
            "model": ["1", 0],
            "clip": ["1", 1],
            "waveft_name": ADAPTER,
            "strength_model": 1.0,
            "strength_clip": 1.0,
        },
    }
    g.update(_txt2img(["2", 0], ["2", 1], ["1", 2], 3, "a photo of sks dog on the beach"))
    out["waveft_txt2img"] = (
        g,
        [
            (
                "Load WaveFT applies the adapter to the model and its text encoder. Put adapters "
                "in models/waveft (or models/loras); PEFT folders work too (listed with a '/').",
                (40, 560),
            )
        ],
    )

    g = dict(ckpt)
    g["2"] = {
        "class_type": "WaveFTLoader",
        "inputs": {
            "model": ["1", 0],
            "clip": ["1", 1],
            "waveft_name": ADAPTER,
            "strength_model": 0.9,
            "strength_clip": 0.9,
        },
    }
    g["3"] = {
        "class_type": "LoraLoader",
        "inputs": {
            "model": ["2", 0],
            "clip": ["2", 1],
            "lora_name": "my_style_lora.safetensors",
            "strength_model": 0.6,
            "strength_clip": 0.6,
        },
    }
    g.update(_txt2img(["3", 0], ["3", 1], ["1", 2], 4, "a watercolor of sks dog"))
    out["waveft_with_lora"] = (g, [("WaveFT and LoRA patches add up: chain the loaders in any order.", (40, 560))])

    g = dict(ckpt)
    g["2"] = {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": "my_subject"}}
    g["3"] = {
        "class_type": "MakeTrainingDataset",
        "inputs": {"images": ["2", 0], "vae": ["1", 2], "clip": ["1", 1], "texts": ["2", 1]},
    }
    g["4"] = {
        "class_type": "WaveFTTrain",
        "inputs": {
            "model": ["1", 0],
            "latents": ["3", 0],
            "positive": ["3", 1],
            "steps": 500,
            "learning_rate": 1e-4,
            "batch_size": 1,
            "grad_accumulation_steps": 4,
            "n_coefficients": keys.DEFAULT_COEFFICIENTS,
            "scaling": keys.DEFAULT_SCALING,
            "wavelet": keys.DEFAULT_WAVELET,
            "targets": "attention q/k/v/out",
            "seed": 0,
            "optimizer": "AdamW",
            "lr_schedule": "constant",
            "warmup_steps": 0,
            "training_dtype": "bf16",
            "gradient_checkpointing": True,
            "save_every_n_steps": 100,
            "filename_prefix": "my_subject_waveft",
            "resume_from": "none",
            "captions": ["2", 1],
            "preview_vae": ["1", 2],
            "preview_positive": ["7", 0],
            "preview_negative": ["8", 0],
            "preview_every_n_steps": 50,
            "preview_width": 512,
            "preview_height": 512,
            "preview_steps": 20,
            "preview_cfg": 6.0,
        },
    }
    g["5"] = {
        "class_type": "WaveFTSave",
        "inputs": {
            "waveft": ["4", 1],
            "filename_prefix": "my_subject_waveft",
            "title": "my subject",
            "trigger_words": "sks",
            "description": "trained in ComfyUI with WaveFT",
        },
    }
    g["6"] = {"class_type": "LossGraphNode", "inputs": {"loss": ["4", 2], "filename_prefix": "waveft_loss"}}
    g.update(_txt2img(["4", 0], ["1", 1], ["1", 2], 7, "a photo of sks on a mountain", prefix="WaveFT_trained"))
    g["13"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 4], "filename_prefix": "WaveFT_previews"}}
    out["waveft_train"] = (
        g,
        [
            (
                "1. Put images with captions (photo.png + photo.txt) in ComfyUI/input/my_subject.\n2. Queue. The paper's "
                "SDXL recipe: attention layers, 2592 coefficients, scaling 25, lr 1e-4, 500 steps, batch 1 x accumulation "
                "4.\n3. Every 50 steps a preview is sampled with the adapter so far (the prompt of the sampler below) and "
                "shown on the node; all previews are saved as one grid at the end.\n4. The trained model samples at once; "
                "the file lands in models/waveft.",
                (40, 560),
            )
        ],
    )

    g = dict(ckpt)
    g["2"] = {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": "my_subject"}}
    g["3"] = {
        "class_type": "MakeTrainingDataset",
        "inputs": {"images": ["2", 0], "vae": ["1", 2], "clip": ["1", 1], "texts": ["2", 1]},
    }
    g["4"] = {
        "class_type": "TrainLoraNode",
        "inputs": {
            "model": ["1", 0],
            "latents": ["3", 0],
            "positive": ["3", 1],
            "batch_size": 1,
            "grad_accumulation_steps": 4,
            "steps": 500,
            "learning_rate": 1e-4,
            "rank": 1,
            "optimizer": "AdamW",
            "loss_function": "MSE",
            "seed": 0,
            "training_dtype": "bf16",
            "lora_dtype": "bf16",
            "algorithm": "WaveFT",
            "gradient_checkpointing": True,
            "existing_lora": "[None]",
        },
    }
    g["5"] = {
        "class_type": "SaveLoRA",
        "inputs": {"lora": ["4", lora_slot], "prefix": "loras/my_subject_waveft", "steps": ["4", lora_slot + 2]},
    }
    g["6"] = {
        "class_type": "LossGraphNode",
        "inputs": {"loss": ["4", lora_slot + 1], "filename_prefix": "waveft_stock_loss"},
    }
    g["7"] = {
        "class_type": "LoraModelLoader",
        "inputs": {"model": ["1", 0], "lora": ["4", lora_slot], "strength_model": 1.0},
    }
    g.update(_txt2img(["7", 0], ["1", 1], ["1", 2], 8, "a photo of sks on a mountain", prefix="WaveFT_stock"))
    out["waveft_stock_train"] = (
        g,
        [
            (
                "ComfyUI's own Train LoRA node with algorithm WaveFT: every layer gets rank x (in + out) wavelet "
                "coefficients (db1, scaling 25), biases and norms full diffs.\n1. Put images with captions in "
                "ComfyUI/input/my_subject. 2. Queue. 3. Save LoRA Weights writes output/loras/my_subject_waveft_500_steps_"
                "….safetensors: move it to models/loras for Load LoRA or Load WaveFT. This graph samples it at once (Load "
                "LoRA Model).\nMade for ComfyUI 0.33; on 0.8 Train LoRA outputs a MODEL first: reconnect lora, loss and "
                "steps to its next outputs.",
                (40, 560),
            )
        ],
    )

    g = dict(ckpt)
    g["2"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks dog", "clip": ["1", 1]}}
    g["3"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}}
    g["4"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}}
    batches = []
    for k, strength in enumerate((0.0, 0.5, 1.0, 1.5)):
        base = 10 + 10 * k
        g[str(base)] = {
            "class_type": "WaveFTLoaderModelOnly",
            "inputs": {"model": ["1", 0], "waveft_name": ADAPTER, "strength_model": strength},
        }
        g[str(base + 1)] = {
            "class_type": "KSampler",
            "inputs": {
                "model": [str(base), 0],
                "seed": 42,
                "steps": 25,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "denoise": 1.0,
            },
        }
        g[str(base + 2)] = {"class_type": "VAEDecode", "inputs": {"samples": [str(base + 1), 0], "vae": ["1", 2]}}
        batches.append([str(base + 2), 0])
    g["60"] = {"class_type": "ImageBatch", "inputs": {"image1": batches[0], "image2": batches[1]}}
    g["61"] = {"class_type": "ImageBatch", "inputs": {"image1": ["60", 0], "image2": batches[2]}}
    g["62"] = {"class_type": "ImageBatch", "inputs": {"image1": ["61", 0], "image2": batches[3]}}
    g["63"] = {"class_type": "SaveImage", "inputs": {"images": ["62", 0], "filename_prefix": "WaveFT_sweep"}}
    out["waveft_strength_sweep"] = (
        g,
        [("Same seed at strengths 0, 0.5, 1.0 and 1.5: the saved batch shows as a grid.", (40, 560))],
    )

    g = {
        "1": {
            "class_type": "WaveFTToLoRA",
            "inputs": {"waveft_name": ADAPTER, "rank": 8, "filename_prefix": "my_waveft_as_lora"},
        }
    }
    out["waveft_export_lora"] = (
        g,
        [
            (
                "Writes models/loras/my_waveft_as_lora.safetensors (truncated SVD of each "
                "layer's ΔW; the node reports the energy kept). Refresh (R), then load it with "
                "the stock Load LoRA node or in any LoRA tool.",
                (420, 40),
            )
        ],
    )
    return out


def made_for(ui: dict) -> str:
    """The ComfyUI version a shipped workflow was generated for ('' when it does not say)."""
    return str(ui.get("extra", {}).get("waveft", {}).get("made_for_comfyui", ""))


def render(object_info: dict, version: str) -> dict:
    """name -> UI-format workflow, for the host whose /object_info and version these are."""
    out = {}
    for name, (graph, notes) in specs(object_info).items():
        ui = api_to_ui(graph, object_info, notes, version)
        ui_to_api(ui, object_info)  # round trip check
        out[name] = ui
    return out


def main(url: str):
    import urllib.request

    def get(path):
        with urllib.request.urlopen(url.rstrip("/") + path, timeout=60) as r:
            return json.loads(r.read())

    version = get("/system_stats")["system"]["comfyui_version"]
    folder = ROOT / "workflows"
    folder.mkdir(exist_ok=True)
    for name, ui in render(get("/object_info"), version).items():
        (folder / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n", encoding="utf-8")
        print(f"wrote workflows/{name}.json ({len(ui['nodes'])} nodes) for ComfyUI {version}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8188")
