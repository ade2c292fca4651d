"""How other tools read a LoRA-like file's metadata, written down from their code (not imported: they are
ComfyUI packs with servers of their own), so tests can read our files the way they do.

- ComfyUI-Lora-Manager (py/utils/lora_metadata.py, model_utils.py, file_utils.py, mid-2026): the base model is
  `ss_base_model_version` matched by substring against a small table; trigger words are the first folder of
  `ss_tag_frequency` sorted by count, plus `ss_datasets[0].subsets[0].class_tokens`; the Civitai id (AutoV3)
  is the first 12 hex digits of `sshs_model_hash`, else of `modelspec.hash_sha256` without its "0x".
- kohya's sd-scripts (library/train_util.py, library/sai_model_spec.py): the addnet hash is the SHA-256 of the
  bytes after the header; the legacy one the first 8 hex digits of the SHA-256 of bytes 0x100000..0x110000
  of the file written with the ss_* keys only; the model-spec hash the SHA-256 over each tensor saved alone,
  in the file's order, after the header.
"""

from __future__ import annotations

import hashlib
import json
import struct

LORA_MANAGER_BASE_MODELS = {
    "sd_1.5": "SD 1.5",
    "sd-v1-5": "SD 1.5",
    "sd-v2-1": "SD 2.1",
    "sdxl": "SDXL 1.0",
    "sd-v2": "SD 2.0",
    "flux1": "Flux.1 D",
    "flux.1 d": "Flux.1 D",
    "illustrious": "Illustrious",
    "il": "Illustrious",
    "pony": "Pony",
}


def header(path) -> tuple[dict, int]:
    """The safetensors header (a dict) and the offset where the tensor data starts."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


def metadata(path) -> dict:
    return header(path)[0].get("__metadata__", {})


def lora_manager_view(path) -> dict:
    md = metadata(path)
    version = str(md.get("ss_base_model_version") or "")
    base = next((v for k, v in LORA_MANAGER_BASE_MODELS.items() if k in version.lower()), version or "Unknown")
    words: list = []
    if "ss_tag_frequency" in md:
        folders = json.loads(md["ss_tag_frequency"])
        if folders:
            words = sorted(folders[next(iter(folders))].items(), key=lambda x: x[1], reverse=True)
    class_tokens = None
    if "ss_datasets" in md:
        datasets = json.loads(md["ss_datasets"])
        if datasets and isinstance(datasets, list) and datasets[0].get("subsets"):
            class_tokens = datasets[0]["subsets"][0].get("class_tokens")
    embedded = md.get("sshs_model_hash") or md.get("modelspec.hash_sha256") or ""
    embedded = embedded.strip().removeprefix("0x")
    return {
        "base_model": base,
        "trained_words": [w for w, _ in words],
        "class_tokens": class_tokens,
        "autov3": embedded[:12].lower() if len(embedded) >= 12 else None,
    }


def addnet_hash(path) -> str:
    """The SHA-256 of the tensor data, read from the file itself (A1111's and kohya's 'addnet' hash)."""
    _, start = header(path)
    with open(path, "rb") as f:
        f.seek(start)
        return hashlib.sha256(f.read()).hexdigest()


def kohya_legacy_hash(path) -> str:
    """Re-save the file's tensors with its ss_* keys only, then hash bytes 0x100000..0x110000."""
    from safetensors.torch import load_file, save

    training = {k: v for k, v in metadata(path).items() if k.startswith("ss_")}
    serialized = save(load_file(str(path)), training)
    return hashlib.sha256(serialized[0x100000:0x110000]).hexdigest()[:8]


def modelspec_hash(path) -> str:
    """kohya's sai_model_spec hash: each tensor saved alone, data after its header, hashed in file order."""
    from safetensors.torch import load_file, save

    entries, _ = header(path)
    order = sorted((k for k in entries if k != "__metadata__"), key=lambda k: entries[k]["data_offsets"][0])
    tensors = load_file(str(path))
    digest = hashlib.sha256()
    for key in order:
        one = save({"tensor": tensors[key]})
        n = struct.unpack("<Q", one[:8])[0]
        digest.update(one[8 + n :])
    return "0x" + digest.hexdigest()
