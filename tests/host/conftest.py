"""Host tests: the pack inside a real ComfyUI (COMFYUI_PATH), in-process and over HTTP.

They skip, saying why, when COMFYUI_PATH is unset or that ComfyUI cannot be imported by this Python
(`./dev test` runs them with the host's own venv)."""
import asyncio
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
COMFY = os.environ.get("COMFYUI_PATH")


def _skip_reason():
    if not COMFY:
        return "COMFYUI_PATH is not set: host tests need a ComfyUI checkout (see README, 'Tests')"
    if not os.path.isfile(os.path.join(COMFY, "main.py")):
        return f"COMFYUI_PATH={COMFY} holds no ComfyUI checkout (no main.py)"
    # ComfyUI's folder must come before the repository root: its nodes.py and our nodes/ share a name.
    for p in (COMFY, str(HERE)):
        if p in sys.path:
            sys.path.remove(p)
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, COMFY)
    try:
        import torch
        from comfy.cli_args import args

        if not torch.cuda.is_available():
            args.cpu = True  # as `main.py --cpu`; must precede comfy.model_management's import
        import comfy.sd  # noqa: F401
        import folder_paths  # noqa: F401
        import nodes  # noqa: F401
    except Exception as e:  # ImportError, or a host dependency failing at import
        return (f"ComfyUI at {COMFY} cannot be imported by {sys.executable} ({type(e).__name__}: {e}); "
                "./dev test runs the host tests with the host's venv (COMFYUI_PYTHON)")
    return None


SKIP = _skip_reason()


def pytest_collection_modifyitems(config, items):
    if SKIP:
        marker = pytest.mark.skip(reason=SKIP)
        for item in items:
            if HERE in Path(str(item.fspath)).parents or Path(str(item.fspath)).parent == HERE:
                item.add_marker(marker)


@pytest.fixture(scope="session")
def pack(tmp_path_factory):
    """The pack loaded the way ComfyUI loads custom nodes, from a folder named like a real install."""
    import nodes

    folder = tmp_path_factory.mktemp("custom_nodes") / "ComfyUI-WaveFT"
    folder.symlink_to(ROOT, target_is_directory=True)
    assert asyncio.run(nodes.load_custom_node(str(folder))), "the pack failed to import (see the log)"
    module = sys.modules[str(folder).replace(".", "_x_")]
    return module


@pytest.fixture(scope="session")
def checkpoint_state():
    from tiny_models import make_checkpoint_state

    return make_checkpoint_state()


@pytest.fixture(scope="session")
def sd15(checkpoint_state):
    """(model, clip, vae) of the tiny SD1.5 checkpoint, loaded by ComfyUI's own loader."""
    import comfy.sd
    import torch

    with torch.inference_mode():  # as ComfyUI's executor loads checkpoints
        model, clip, vae, _ = comfy.sd.load_state_dict_guess_config(dict(checkpoint_state))
    return model, clip, vae


@pytest.fixture
def waveft_dir(tmp_path):
    """A models/waveft folder for this test, registered first in ComfyUI's search paths."""
    import folder_paths

    d = tmp_path / "waveft"
    d.mkdir()
    paths, exts = folder_paths.folder_names_and_paths["waveft"]
    folder_paths.folder_names_and_paths["waveft"] = ([str(d)] + list(paths), exts)
    folder_paths.filename_list_cache.clear()
    yield d
    folder_paths.folder_names_and_paths["waveft"] = (paths, exts)
    folder_paths.filename_list_cache.clear()


@pytest.fixture(scope="session")
def server(tmp_path_factory, checkpoint_state):
    from safetensors.torch import save_file

    import waveft_core as wft
    from host_tools import Server, adapter_for, make_dataset, merged, tiny_lora

    base = tmp_path_factory.mktemp("comfy_base")
    for d in ("models/checkpoints", "models/waveft", "models/loras", "custom_nodes", "input", "output"):
        (base / d).mkdir(parents=True)
    (base / "custom_nodes" / "ComfyUI-WaveFT").symlink_to(ROOT, target_is_directory=True)
    adapter = adapter_for(checkpoint_state)
    wft.save(adapter, base / "models/waveft/e2e.safetensors")
    save_file(checkpoint_state, str(base / "models/checkpoints/tiny.safetensors"))
    save_file(merged(checkpoint_state, adapter, 0.8), str(base / "models/checkpoints/merged.safetensors"))
    (base / "models/waveft/broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}")
    save_file(tiny_lora(checkpoint_state), str(base / "models/loras/tiny_lora.safetensors"))
    make_dataset(base / "input" / "my_subject")
    srv = Server(base, base / "server.log")
    srv.adapter = adapter
    yield srv
    srv.stop()
