"""The metadata keys other tools read, filled from what this project knows.

LoRA managers (ComfyUI-Lora-Manager, rgthree's Power Lora Loader), A1111's Lora tab and sharing sites read
the keys kohya's sd-scripts writes (`ss_*`, `sshs_*`) and the Stability AI model spec (`modelspec.*`); none
reads this project's own `waveft.training`. So a saved adapter carries, besides its own keys:

- trigger words where managers look for them: `ss_tag_frequency` (Lora-Manager reads the first folder's
  counts, highest first), `ss_datasets[0].subsets[0].class_tokens`, and `modelspec.trigger_phrase`;
- the run's settings as kohya names them (`ss_steps`, `ss_learning_rate`, `ss_resolution`...);
- content hashes as kohya computes them: `sshs_model_hash` is the SHA-256 of the file's tensor data (the
  bytes after the header: metadata does not change it, so a reader can check it against the file), and
  `sshs_legacy_hash` the first 8 hex digits of the SHA-256 of bytes 0x100000..0x110000 of the file as it
  would be written with the `ss_*` keys alone; `modelspec.hash_sha256` is the model spec's hash of the same
  tensor data, "0x"-prefixed.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import TYPE_CHECKING, Callable, Mapping

from ..keys import (
    HASH_KEYS,
    KOHYA_PREFIX,
    META_DATASETS,
    META_LEGACY_HASH,
    META_MODEL_HASH,
    META_NETWORK_ARGS,
    META_SPEC_HASH,
    META_TAG_FREQUENCY,
    META_TRIGGER_PHRASE,
)

if TYPE_CHECKING:  # the training package imports this module
    from ..training.config import TrainRecord

DEFAULT_DATASET_DIR = "img"  # the folder name kohya's examples use; managers read the counts, not the name


def trigger_phrases(text: str) -> list[str]:
    """'sks dog, photo of sks' -> ['sks dog', 'photo of sks']: comma-separated, trimmed, each once."""
    out: list[str] = []
    for part in str(text or "").split(","):
        part = part.strip()
        if part and part not in out:
            out.append(part)
    return out


def _json(metadata: Mapping, key: str, kind: type):
    try:
        value = json.loads(metadata.get(key) or "null")
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, kind) else None


def tag_frequency(captions) -> str:
    """kohya's ss_tag_frequency, {folder: {tag: count}} as JSON, from comma-separated captions."""
    counts: dict = {}
    for caption in captions if isinstance(captions, list) else [captions]:
        for tag in str(caption).split(","):
            tag = tag.strip()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return json.dumps({DEFAULT_DATASET_DIR: counts}, ensure_ascii=False)


def with_trigger_words(metadata: Mapping, text: str) -> dict:
    """`metadata` with the trigger words of `text` written where managers read them; unchanged when empty.

    In the first folder of ss_tag_frequency they come first, counted as often as the most frequent tag, so a
    manager that lists tags by frequency lists them first; other folders and tags stay as they were."""
    md = dict(metadata)
    phrases = trigger_phrases(text)
    if not phrases:
        return md
    md[META_TRIGGER_PHRASE] = ", ".join(phrases)

    folders = _json(md, META_TAG_FREQUENCY, dict) or {}
    first = next(iter(folders), DEFAULT_DATASET_DIR)
    counts = folders.get(first) if isinstance(folders.get(first), dict) else {}
    images = _as_int(md.get("ss_num_train_images"))
    top = max([int(c) for c in counts.values() if isinstance(c, (int, float))] + [images or 1])
    merged = {p: top for p in phrases}
    merged.update({tag: c for tag, c in counts.items() if tag not in merged})
    folders = {first: merged, **{k: v for k, v in folders.items() if k != first}}
    md[META_TAG_FREQUENCY] = json.dumps(folders, ensure_ascii=False)

    datasets = _json(md, META_DATASETS, list) or []
    if not datasets or not isinstance(datasets[0], dict):
        datasets = [{"is_dreambooth": True, **({"num_train_images": images} if images else {})}] + datasets[1:]
    subsets = datasets[0].get("subsets") if isinstance(datasets[0].get("subsets"), list) else []
    if not subsets or not isinstance(subsets[0], dict):
        subsets = [{"image_dir": first, **({"img_count": images} if images else {})}] + subsets[1:]
    subsets[0] = {**subsets[0], "class_tokens": ", ".join(phrases)}
    datasets[0] = {**datasets[0], "subsets": subsets}
    md[META_DATASETS] = json.dumps(datasets, ensure_ascii=False)
    return md


def _as_int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def training_keys(record: TrainRecord, steps_done: int) -> dict:
    """kohya's `ss_*` keys for a run as its file records it (training/config.py)."""
    c = record.config
    md: dict[str, str] = {"ss_steps": str(int(steps_done))}
    simple = (
        (record.steps_total, "ss_max_train_steps"),
        (c.learning_rate, "ss_learning_rate"),
        (c.learning_rate, "ss_unet_lr"),
        (c.optimizer, "ss_optimizer"),
        (c.lr_schedule, "ss_lr_scheduler"),
        (c.warmup_steps, "ss_lr_warmup_steps"),
        (c.grad_accumulation_steps, "ss_gradient_accumulation_steps"),
        (c.gradient_checkpointing, "ss_gradient_checkpointing"),
        (c.seed, "ss_seed"),
        (record.dataset_size, "ss_num_train_images"),
        (record.batch_size, "ss_batch_size_per_device"),
        (record.started_at, "ss_training_started_at"),
        (record.finished_at, "ss_training_finished_at"),
        (record.base_checkpoint, "ss_sd_model_name"),
    )
    for value, key in simple:
        if value not in (None, ""):
            md[key] = str(value)
    md["ss_mixed_precision"] = "bf16" if c.training_dtype == "bf16" else "no"
    resolution = record.resolution
    if isinstance(resolution, (list, tuple)) and len(resolution) == 2:
        width, height = (int(v) for v in resolution)
        md["ss_resolution"] = f"({width}, {height})"
        md["modelspec.resolution"] = f"{width}x{height}"
    network_args = {"wavelet": record.wavelet, "n_coefficients": record.n_coefficients, "scaling": record.scaling}
    md[META_NETWORK_ARGS] = json.dumps({**network_args, "targets": c.targets}, sort_keys=True)
    if record.dataset_size:
        dataset = {
            "is_dreambooth": True,
            "num_train_images": int(record.dataset_size),
            "num_reg_images": 0,
            "subsets": [
                {
                    "image_dir": DEFAULT_DATASET_DIR,
                    "img_count": int(record.dataset_size),
                    "num_repeats": 1,
                    "is_reg": False,
                }
            ],
        }
        if record.batch_size:
            dataset["batch_size_per_device"] = int(record.batch_size)
        if "ss_resolution" in md:
            dataset["resolution"] = [width, height]
        md[META_DATASETS] = json.dumps([dataset])
        md["ss_num_reg_images"] = "0"
    return md


def tensor_data_sha256(serialized: bytes) -> str:
    """SHA-256 of a safetensors file's tensor data: everything after the 8-byte length and the header."""
    header_length = int.from_bytes(serialized[:8], "little")
    return hashlib.sha256(memoryview(serialized)[8 + header_length :]).hexdigest()


def _serialized_for_hashes(tensors: Mapping, metadata: Mapping) -> bytes:
    """The file as kohya hashes it: the tensors with the `ss_*` keys alone (the legacy hash reads its bytes)."""
    from safetensors.torch import save

    return save(dict(tensors), {k: str(v) for k, v in metadata.items() if k.startswith(KOHYA_PREFIX)})


def _hashes(serialized: bytes) -> dict:
    data_hash = tensor_data_sha256(serialized)
    legacy = hashlib.sha256(serialized[0x100000:0x110000]).hexdigest()[:8]
    return {META_MODEL_HASH: data_hash, META_LEGACY_HASH: legacy, META_SPEC_HASH: "0x" + data_hash}


def content_hashes(tensors: Mapping, metadata: Mapping) -> dict:
    """The three hash keys (HASH_KEYS) for a file of `tensors` and `metadata`, as kohya computes them."""
    return _hashes(_serialized_for_hashes(tensors, metadata))


def hashed_file(tensors: Mapping, metadata: Mapping) -> tuple[dict[str, str], Callable[[str], None]]:
    """`metadata` with the hash keys (always recomputed: hashes carried over from a source would name other
    bytes), and a function writing the file of `tensors` and that metadata to a path (for atomic_write), from
    one serialization of the tensors: the one the hashes are computed from."""
    from .storage import with_metadata, write_parts

    serialized = _serialized_for_hashes(tensors, metadata)
    full = {str(k): str(v) for k, v in metadata.items() if k not in HASH_KEYS}
    full.update(_hashes(serialized))
    parts = with_metadata(serialized, full)
    return full, lambda path: write_parts(path, parts)


def data_uri(image: bytes, mime: str = "image/png") -> str:
    """An image as the model spec's `modelspec.thumbnail` holds it."""
    return f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"
