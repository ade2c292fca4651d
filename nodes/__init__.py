"""ComfyUI nodes of the pack. The only code that imports comfy.*, folder_paths or comfy_api."""
from . import host
from .loader import WaveFTInfo, WaveFTLoader, WaveFTLoaderModelOnly

host.register_folder()
host.register_adapter_class()

NODE_CLASS_MAPPINGS = {
    "WaveFTLoader": WaveFTLoader,
    "WaveFTLoaderModelOnly": WaveFTLoaderModelOnly,
    "WaveFTInfo": WaveFTInfo,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WaveFTLoader": "Load WaveFT",
    "WaveFTLoaderModelOnly": "Load WaveFT (model only)",
    "WaveFTInfo": "WaveFT Info",
}
