"""Host tests: the pack inside a real ComfyUI (COMFYUI_PATH), in-process and over HTTP.

They skip, saying why, when COMFYUI_PATH is unset or that ComfyUI cannot be imported by this Python
(`./dev test` runs them with the host's own venv). With WAVEFT_REQUIRE_HOST=1 (set by `./dev test` under CI)
a host that cannot be used, or any host test that skips, fails the run instead.

A test marked `host_feature(name)` needs a part of the host that older versions lack (see HOST_FEATURES); on
such a host it is deselected, with one line saying so, rather than skipped: it does not apply there."""

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
        return (
            f"ComfyUI at {COMFY} cannot be imported by {sys.executable} ({type(e).__name__}: {e}); "
            "./dev test runs the host tests with the host's venv (COMFYUI_PYTHON)"
        )
    return None


SKIP = _skip_reason()
REQUIRE_HOST = os.environ.get("WAVEFT_REQUIRE_HOST", "") not in ("", "0")


def _has_adapter_rebuild() -> bool:
    """ComfyUI >= 0.21: adapters rebuilt from moved weights (prefetch_prepared_value, LowVramPatch.prepare)."""
    import comfy.lora
    from comfy.model_patcher import LowVramPatch

    return hasattr(comfy.lora, "prefetch_prepared_value") and hasattr(LowVramPatch, "prepare")


def _has_bypass() -> bool:
    """ComfyUI's bypass mode (comfy/weight_adapter/bypass.py, comfy.sd.load_bypass_lora_for_models)."""
    import importlib.util

    import comfy.sd

    return importlib.util.find_spec("comfy.weight_adapter.bypass") is not None and hasattr(
        comfy.sd, "load_bypass_lora_for_models"
    )


def _has_dynamic_vram() -> bool:
    """ComfyUI's dynamic VRAM (ModelPatcherDynamic; it only starts on CUDA, its clone(disable_dynamic=) exists)."""
    import inspect

    import comfy.model_patcher as mp

    return (
        hasattr(mp, "ModelPatcherDynamic") and "disable_dynamic" in inspect.signature(mp.ModelPatcher.clone).parameters
    )


def _has_anima() -> bool:
    """ComfyUI's Anima model (supported_models.Anima, 0.33; 0.8 has none)."""
    import comfy.supported_models

    return hasattr(comfy.supported_models, "Anima")


HOST_FEATURES = {
    "adapter_rebuild": _has_adapter_rebuild,
    "bypass": _has_bypass,
    "dynamic_vram": _has_dynamic_vram,
    "anima": _has_anima,
}


def host_version() -> str:
    try:
        from comfyui_version import __version__

        return __version__
    except Exception:
        return "unknown"


def _has_rope_backward() -> bool:
    """The host's rotary-embedding kernel differentiates on this machine (0.8's comfy_kitchen.apply_rope, which
    Flux, Lumina, Wan and the other rotary DiTs call, has no CPU backward; 0.3x uses plain torch while training)."""
    import comfy.ldm.flux.math as fm
    import comfy.model_management as mm
    import torch

    q = torch.randn(1, 1, 2, 4, requires_grad=True)
    pe = fm.rope(torch.arange(2.0)[None], 4, 10000)[:, None]
    before = getattr(mm, "in_training", None)
    mm.in_training = True  # as the trainer runs it
    try:
        out, _ = fm.apply_rope(q, q, pe)
        out.sum().backward()
    except Exception:
        return False
    finally:
        if before is None:
            del mm.in_training
        else:
            mm.in_training = before
    return True


HOST_FEATURES["rope_backward"] = _has_rope_backward


def _is_host_test(item) -> bool:
    path = Path(str(item.fspath))
    return HERE in path.parents or path.parent == HERE


def pytest_configure(config):
    config.addinivalue_line("markers", "host_feature(name): needs a part of ComfyUI that older versions lack")


_HOST_NODEIDS: set = set()
_SKIPPED_HOST_TESTS: list = []


def pytest_collection_modifyitems(config, items):
    host_items = [item for item in items if _is_host_test(item)]
    _HOST_NODEIDS.update(item.nodeid for item in host_items)
    if SKIP:
        if REQUIRE_HOST and host_items:
            raise pytest.UsageError(f"WAVEFT_REQUIRE_HOST is set but the host tests cannot run: {SKIP}")
        marker = pytest.mark.skip(reason=SKIP)
        for item in host_items:
            item.add_marker(marker)
        return
    absent = {name for name, present in HOST_FEATURES.items() if not present()}
    dropped = [item for item in host_items if any(m.args[0] in absent for m in item.iter_markers("host_feature"))]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"[host] ComfyUI {host_version()} has no {', '.join(sorted(absent))}: "
                f"{len(dropped)} test(s) that need it deselected"
            )


def pytest_runtest_logreport(report):
    if report.skipped and report.nodeid in _HOST_NODEIDS:
        _SKIPPED_HOST_TESTS.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if REQUIRE_HOST and _SKIPPED_HOST_TESTS and session.exitstatus == 0:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"[host] WAVEFT_REQUIRE_HOST: {len(_SKIPPED_HOST_TESTS)} host test(s) skipped, "
                f"e.g. {_SKIPPED_HOST_TESTS[0]}",
                red=True,
            )
        session.exitstatus = 1


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


def _model_folder(tmp_path, kind):
    """A models/<kind> folder for one test, registered first in ComfyUI's search paths."""
    import folder_paths

    d = tmp_path / kind
    d.mkdir()
    paths, exts = folder_paths.folder_names_and_paths[kind]
    folder_paths.folder_names_and_paths[kind] = ([str(d)] + list(paths), exts)
    folder_paths.filename_list_cache.clear()
    yield d
    folder_paths.folder_names_and_paths[kind] = (paths, exts)
    folder_paths.filename_list_cache.clear()


@pytest.fixture
def waveft_dir(tmp_path):
    yield from _model_folder(tmp_path, "waveft")


@pytest.fixture
def loras_dir(tmp_path):
    yield from _model_folder(tmp_path, "loras")


@pytest.fixture(scope="session")
def server(tmp_path_factory, checkpoint_state):
    from host_tools import Server, adapter_for, make_dataset, merged, tiny_lora
    from safetensors.torch import save_file

    import waveft_core as wft

    base = tmp_path_factory.mktemp("comfy_base")
    for d in ("models/checkpoints", "models/waveft", "models/loras", "custom_nodes", "input", "output"):
        (base / d).mkdir(parents=True)
    (base / "custom_nodes" / "ComfyUI-WaveFT").symlink_to(ROOT, target_is_directory=True)
    adapter = adapter_for(checkpoint_state)
    wft.save(adapter, base / "models/waveft/e2e.safetensors")
    save_file(checkpoint_state, str(base / "models/checkpoints/tiny.safetensors"))
    save_file(merged(checkpoint_state, adapter, 0.8), str(base / "models/checkpoints/merged.safetensors"))
    (base / "models/waveft/broken.safetensors").write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a": 1}')
    save_file(tiny_lora(checkpoint_state), str(base / "models/loras/tiny_lora.safetensors"))
    make_dataset(base / "input" / "my_subject")
    srv = Server(base, base / "server.log")
    srv.adapter = adapter
    yield srv
    srv.stop()
