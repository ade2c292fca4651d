"""ComfyUI nodes of the pack. The only code that imports comfy.*, folder_paths or comfy_api."""

from . import host
from .convert_nodes import WaveFTFromLoRA, WaveFTMergeCheckpoint, WaveFTToLoRA
from .loader import WaveFTInfo, WaveFTLoader, WaveFTLoaderModelOnly
from .train_nodes import WaveFTApply, WaveFTSave, WaveFTTrain

host.register_folder()
host.register_adapter_class()
host.guard_stock_loaders()
host.check_dependencies()

NODE_CLASS_MAPPINGS = {
    "WaveFTLoader": WaveFTLoader,
    "WaveFTLoaderModelOnly": WaveFTLoaderModelOnly,
    "WaveFTInfo": WaveFTInfo,
    "WaveFTTrain": WaveFTTrain,
    "WaveFTSave": WaveFTSave,
    "WaveFTApply": WaveFTApply,
    "WaveFTToLoRA": WaveFTToLoRA,
    "WaveFTFromLoRA": WaveFTFromLoRA,
    "WaveFTMergeCheckpoint": WaveFTMergeCheckpoint,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WaveFTLoader": "Load WaveFT",
    "WaveFTLoaderModelOnly": "Load WaveFT (model only)",
    "WaveFTInfo": "WaveFT Info",
    "WaveFTTrain": "Train WaveFT",
    "WaveFTSave": "Save WaveFT",
    "WaveFTApply": "Apply WaveFT",
    "WaveFTToLoRA": "WaveFT to LoRA",
    "WaveFTFromLoRA": "LoRA to WaveFT",
    "WaveFTMergeCheckpoint": "Merge WaveFT into Checkpoint",
}
