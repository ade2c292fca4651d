"""ComfyUI-WaveFT: WaveFT adapters for ComfyUI. Registers nodes only when imported by ComfyUI, so the
repository also imports as a plain package (tests, tools, the A1111/Forge extension)."""
try:
    import comfy.utils  # noqa: F401  (present only inside ComfyUI)

    _IN_COMFYUI = True
except ImportError:
    _IN_COMFYUI = False

if _IN_COMFYUI:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    WEB_DIRECTORY = "./web"
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
