"""The webui tests' sandbox and their host fixtures: a1111, forge, ldm_webui (reForge and Forge Classic).

With A1111_PATH, FORGE_PATH, REFORGE_PATH, FORGE_CLASSIC_PATH (./dev test unpacks all four from ../shared/webui,
and under CI, WAVEFT_REQUIRE_WEBUIS=1, a missing one fails): the extension is cloned into extensions/ and loaded
by the webui's own modules.script_loading; the webui's real Lora extension (network.py, networks.py, and in A1111
network_*.py, lyco_helpers, extra_networks_lora), its real patchers (A1111's network_apply_weights /
network_forward; Forge's backend.patcher; reForge's and Forge Classic's ldm_patched ModelPatcher and CLIP), its
modules.errors, modules.extra_networks, modules.cache and modules.hashes (caching into a temp folder) and the real
read_metadata_from_safetensors (compiled from modules/sd_models.py alone) load WaveFT files, and the weights they
change must equal Layer.delta * multiplier. Stubbed, as they need a GPU, a model download or the UI:
modules.shared (opts, cmd_opts, walk_files, sd_model), modules.devices, the rest of modules.sd_models,
modules.scripts, modules.sd_hijack, modules.textual_inversion, modules.models.sd3.mmdit (an isinstance check),
modules.paths, gradio; PIL, sentencepiece, torchvision and diffusers.configuration_utils where they cannot import
beside the CPU torch. The models are small torch module trees with each webui's attribute layout (A1111:
model.diffusion_model, cond_stage_model.wrapped / conditioner.embedders[i].wrapped with CLIP-G in OpenCLIP layout;
the Forge family: ComfyUI's diffusion_model.* and clip_l/clip_g.transformer.* parameters); see webui_fakes.py.

Each sandbox stubs modules, then imports a host's real Lora code; everything is undone afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from webui_fakes import (
    UNET_K2,
    UNET_Q,
    fake_clone,
    host_function,
    make_layer,
    save_adapter,
    sd1_layers,
    sdxl_layers,
)

import waveft_core as wft


@contextlib.contextmanager
def sandbox(paths, argv=None):
    saved_modules = dict(sys.modules)
    saved_path, saved_argv = list(sys.path), list(sys.argv)
    for name in ("network", "networks", "lora", "lora_logger", "lora_patches", "lyco_helpers", "extra_networks_lora"):
        sys.modules.pop(name, None)
    sys.path[:0] = [str(p) for p in paths]
    if argv is not None:
        sys.argv = argv
    roots = [str(Path(p).resolve()) for p in paths]
    try:
        yield
    finally:
        sys.path[:], sys.argv[:] = saved_path, saved_argv
        for name in list(sys.modules):
            if name in saved_modules:
                continue
            # the host's code, the stubs (no file) and the extension go; third-party packages imported for the
            # first time stay (torch registers native operators once per process)
            file = getattr(sys.modules[name], "__file__", None)
            if (
                file is None
                or name.startswith("waveft_a1111")
                or any(str(Path(file).resolve()).startswith(r) for r in roots)
            ):
                del sys.modules[name]
        sys.modules.update(saved_modules)


def stub(name, **attrs):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)  # find_spec() must not fail on a stub
    module.__dict__.update(attrs)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent and parent in sys.modules:
        setattr(sys.modules[parent], child, module)
    return module


def _walk_files(path, allowed_extensions=None):
    for root, _, files in os.walk(path):
        for f in sorted(files):
            if allowed_extensions is None or os.path.splitext(f)[1].lower() in allowed_extensions:
                yield os.path.join(root, f)


def _read_state_dict(filename, *args, **kwargs):
    from safetensors.torch import load_file

    return load_file(filename)


def stub_host_modules(host_root: Path, lora_dir: Path):
    """The host modules the Lora code imports that play no part in the math (see the module docstring)."""
    modules_pkg = stub("modules")
    modules_pkg.__path__ = [str(host_root / "modules")]  # modules.errors, modules.extra_networks: real
    opts = types.SimpleNamespace(
        lora_preferred_name="Alias from file",
        lora_in_memory_limit=0,
        lora_not_found_warning_console=False,
        lora_not_found_gradio_warning=False,
        lora_add_hashes_to_infotext=False,
        lora_functional=False,
        lora_bundled_ti_to_infotext=False,
        sd_lora="None",
        extra_networks_default_multiplier=1.0,
    )
    shared = stub(
        "modules.shared",
        opts=opts,
        sd_model=None,
        walk_files=_walk_files,
        cmd_opts=types.SimpleNamespace(
            lora_dir=str(lora_dir), lyco_dir_backcompat=str(lora_dir / "lyco"), no_hashing=False
        ),
    )
    stub(
        "modules.devices",
        cpu=torch.device("cpu"),
        device=torch.device("cpu"),
        dtype=torch.float32,
        torch_gc=lambda: None,
        cond_cast_unet=lambda x: x,
    )
    from modules import errors  # the host's own

    read_metadata = host_function(
        host_root / "modules" / "sd_models.py",
        "read_metadata_from_safetensors",
        {"errors": errors, "json": json, "os": os},
    )
    stub(
        "modules.sd_models",
        read_metadata_from_safetensors=read_metadata,
        read_state_dict=_read_state_dict,
        model_data=types.SimpleNamespace(get_sd_model=lambda: None),
    )
    # modules.cache and modules.hashes are the host's own, caching into this run's temporary folder
    data = lora_dir.parent / f"{lora_dir.name}_data"
    data.mkdir(exist_ok=True)
    os.environ["SD_WEBUI_CACHE_FILE"] = str(data / "cache.json")
    os.environ["SD_WEBUI_CACHE_DIR"] = str(data / "cache")
    stub("modules.paths", data_path=str(data), script_path=str(host_root), models_path=str(data / "models"))
    stub("modules.scripts")
    db = types.SimpleNamespace(
        word_embeddings={},
        expected_shape=-1,
        skipped_embeddings={},
        register_embedding=lambda *a: None,
        register_embedding_by_name=lambda *a: None,
    )
    stub("modules.sd_hijack", model_hijack=types.SimpleNamespace(embedding_db=db, comments=[]))
    stub("modules.textual_inversion")
    stub("modules.textual_inversion.textual_inversion", create_embedding_from_data=lambda *a, **k: None)
    stub("modules.models")
    stub("modules.models.sd3")
    stub("modules.models.sd3.mmdit", QkvLinear=type("QkvLinear", (torch.nn.Linear,), {}))
    stub("gradio", Warning=lambda *a, **k: None)
    for name, attrs in (("einops", {"rearrange": None}),):
        try:
            importlib.import_module(name)
        except ImportError:
            stub(name, **attrs)
    return shared


def load_extension(host_root: Path, tmp: Path):
    """The extension as the webui loads it: a clone in extensions/, its scripts/*.py run by the webui's own
    modules.script_loading.load_module. Returns the hooks package the entry script registered."""
    ext = fake_clone(tmp)
    from modules import script_loading

    assert Path(script_loading.__file__).resolve().is_relative_to(host_root.resolve())
    script_loading.load_module(str(ext / "scripts" / "waveft_webui.py"))
    return types.SimpleNamespace(
        webui=sys.modules["waveft_a1111.webui"],
        forge_hooks=sys.modules.get("waveft_a1111.forge_hooks"),
        a1111_hooks=sys.modules.get("waveft_a1111.a1111_hooks"),
    )


def stub_torchvision():
    """PyPI's torchvision does not import beside a CPU torch; ldm_patched imports it at module level (for models
    never built here). transformers is asked first, so it remembers that torchvision is missing."""
    try:
        importlib.import_module("torchvision")
        return
    except Exception:
        pass
    import transformers.utils.import_utils as import_utils

    import_utils.is_torchvision_available()
    for name in (
        "torchvision",
        "torchvision.transforms",
        "torchvision.transforms.functional",
        "torchvision.ops",
        "torchvision.models",
    ):
        stub(name).__path__ = []


def write_files(lora_dir: Path):
    lora_dir.mkdir(parents=True, exist_ok=True)
    refs = {
        "wft_sd1": save_adapter(lora_dir / "wft_sd1.safetensors", sd1_layers(), "sd_v1"),
        "wft_sdxl": save_adapter(lora_dir / "wft_sdxl.safetensors", sdxl_layers(), "sdxl_base_v1-0"),
        "wft_xl_unet": save_adapter(
            lora_dir / "wft_xl_unet.safetensors", {UNET_K2: make_layer((32, 40), 50, 21)}, "sdxl_base_v1-0"
        ),
    }
    # a damaged file: a repeated position
    from safetensors.torch import save_file

    bad = {
        UNET_Q + ".waveft_spectrum": torch.ones(2),
        UNET_Q + ".waveft_indices": torch.tensor([3, 3], dtype=torch.int32),
        UNET_Q + ".waveft_shape": torch.tensor([32, 32]),
    }
    save_file(
        bad,
        str(lora_dir / "bad.safetensors"),
        metadata={
            "waveft.format_version": "1",
            "waveft.wavelet": "db1",
            "waveft.scaling": "25.0",
            "ss_network_module": "waveft",
        },
    )
    # one weight under two spellings that A1111's names ('.' -> '_') make the same (issue 22)
    twin = "diffusion_model." + UNET_Q[len("diffusion_model.") :].replace(".", "_")
    wft.save(
        wft.Adapter(
            layers={UNET_Q: make_layer((32, 32), 20, 31), twin: make_layer((32, 32), 20, 32)},
            metadata={"ss_base_model_version": "sd_v1"},
        ),
        lora_dir / "twice.safetensors",
    )
    # an ordinary kohya LoRA for SD1, which must still go to the host's own loader
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file(
        {
            f"{key}.lora_up.weight": torch.ones(32, 4),
            f"{key}.lora_down.weight": torch.ones(4, 32),
            f"{key}.alpha": torch.tensor(4.0),
        },
        str(lora_dir / "plain_lora.safetensors"),
        metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"},
    )
    # and one on the SDXL UNet layer of the Forge-family models, spelled the LDM way every key map knows
    g = torch.Generator().manual_seed(5)
    key = "lora_unet_" + UNET_K2[len("diffusion_model.") :].replace(".", "_")
    save_file(
        {
            f"{key}.lora_up.weight": torch.randn(32, 4, generator=g),
            f"{key}.lora_down.weight": torch.randn(4, 40, generator=g),
            f"{key}.alpha": torch.tensor(2.0),
        },
        str(lora_dir / "plain_xl_lora.safetensors"),
        metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"},
    )
    return refs


def _checkout(var, probe):
    """The webui checkout named by `var`; the tests skip without one, or fail under WAVEFT_REQUIRE_WEBUIS (CI)."""
    skip = pytest.fail if os.environ.get("WAVEFT_REQUIRE_WEBUIS", "") not in ("", "0") else pytest.skip
    path = os.environ.get(var)
    if not path:
        skip(
            f"{var} is not set: point it at a checkout to test against the real Lora code "
            "(./dev test unpacks them from ../shared/webui)"
        )
    root = Path(path)
    if not (root / probe).is_file():
        skip(f"{var}={path} has no {probe}")
    return root


@pytest.fixture(scope="class")
def a1111(tmp_path_factory):
    root = _checkout("A1111_PATH", "extensions-builtin/Lora/networks.py")
    lora_dir = tmp_path_factory.mktemp("a1111_loras")
    refs = write_files(lora_dir)
    with sandbox([root / "extensions-builtin" / "Lora", root]):
        shared = stub_host_modules(root, lora_dir)
        import extra_networks_lora
        import network
        import networks

        assert Path(networks.__file__).resolve().is_relative_to(root.resolve())
        networks.extra_network_lora = extra_networks_lora.ExtraNetworkLora()
        hooks = load_extension(root, tmp_path_factory.mktemp("a1111_clone"))
        assert getattr(networks, "_waveft_hooked", False)
        yield types.SimpleNamespace(
            root=root, shared=shared, network=network, networks=networks, refs=refs, lora_dir=lora_dir, hooks=hooks
        )


@pytest.fixture(scope="class")
def forge(tmp_path_factory):
    root = _checkout("FORGE_PATH", "backend/patcher/lora.py")
    lora_ext = root / "extensions-builtin" / "sd_forge_lora"
    if not (lora_ext / "networks.py").is_file():
        pytest.skip(f"FORGE_PATH={root} has no extensions-builtin/sd_forge_lora/networks.py")
    lora_dir = tmp_path_factory.mktemp("forge_loras")
    refs = write_files(lora_dir)
    with sandbox([lora_ext, root, root / "packages_3rdparty"], argv=["pytest", "--always-cpu"]):
        for name, attrs in (
            ("PIL", {}),
            ("PIL.Image", {}),
            ("sentencepiece", {"SentencePieceProcessor": type("SentencePieceProcessor", (), {})}),
        ):
            try:
                importlib.import_module(name)
            except ImportError:
                stub(name, **attrs)
        try:
            importlib.import_module("diffusers.configuration_utils")
        except ImportError:
            stub("diffusers")
            stub(
                "diffusers.configuration_utils", ConfigMixin=type("ConfigMixin", (), {}), register_to_config=lambda f: f
            )
        shared = stub_host_modules(root, lora_dir)
        import backend.patcher.lora as lora_backend
        import network
        import networks
        from backend.patcher.base import ModelPatcher
        from backend.patcher.clip import CLIP

        assert Path(networks.__file__).resolve().is_relative_to(root.resolve())
        hooks = load_extension(root, tmp_path_factory.mktemp("forge_clone"))
        assert hooks.webui.install() == "forge"
        yield types.SimpleNamespace(
            root=root,
            shared=shared,
            network=network,
            networks=networks,
            refs=refs,
            lora_backend=lora_backend,
            ModelPatcher=ModelPatcher,
            CLIP=CLIP,
            hooks=hooks,
        )


LDM_WEBUIS = {"reforge": "REFORGE_PATH", "forge-classic": "FORGE_CLASSIC_PATH"}


@pytest.fixture(scope="class", params=sorted(LDM_WEBUIS))
def ldm_webui(request, tmp_path_factory):
    """reForge or Forge Classic: the real extensions-builtin/Lora (network.py, networks.py) and ldm_patched
    (ModelPatcher, CLIP, lora key maps and weight calculation); the extension loaded from extensions/ by the
    webui's own script loader."""
    kind = request.param
    root = _checkout(LDM_WEBUIS[kind], "ldm_patched/modules/model_patcher.py")
    lora_ext = root / "extensions-builtin" / "Lora"
    lora_dir = tmp_path_factory.mktemp(f"{kind}_loras")
    refs = write_files(lora_dir)
    with sandbox([lora_ext, root], argv=["pytest"]):
        shared = stub_host_modules(root, lora_dir)
        stub_torchvision()
        import ldm_patched.modules.args_parser as args_parser

        args_parser.args.always_cpu = True  # as --always-cpu: model_management must not look for CUDA
        import ldm_patched.modules.model_patcher as model_patcher
        import ldm_patched.modules.sd as sd_module
        import network
        import networks

        assert Path(networks.__file__).resolve().is_relative_to(root.resolve())
        hooks = load_extension(root, tmp_path_factory.mktemp(f"{kind}_clone"))
        assert hooks.webui.install() == kind
        yield types.SimpleNamespace(
            kind=kind,
            root=root,
            shared=shared,
            network=network,
            networks=networks,
            refs=refs,
            model_patcher=model_patcher,
            sd=sd_module,
            hooks=hooks,
        )
