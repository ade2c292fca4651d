"""ComfyUI-WaveFT: WaveFT adapters for ComfyUI. Registers nodes only when ComfyUI imports this folder as a
package, so the repository also imports as a plain package (tests, tools, the A1111/Forge extension) and a
tool that loads this file on its own (pytest collecting the checkout's root, whatever the folder is called)
gets an empty module instead of a failed relative import."""

try:
    import comfy.utils  # noqa: F401  (present only inside ComfyUI)

    _IN_COMFYUI = True
except ImportError:
    _IN_COMFYUI = False

if _IN_COMFYUI and __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    WEB_DIRECTORY = "./web"
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
