"""What the hosts (ComfyUI, A1111, Forge) run: the weight-adapter class (weight_adapter), the stock trainer's
WaveFT (stock, stock_loader), the cache of loaded adapters (cache), and the patch plan every host executes
(plan)."""

from . import cache, stock_loader
from .cache import AdapterCache, fingerprint
from .plan import PatchPlan, plan_from_match, plan_patches
from .stock import ALGORITHM as STOCK_ALGORITHM
from .weight_adapter import adapter_class

__all__ = [
    "STOCK_ALGORITHM",
    "AdapterCache",
    "PatchPlan",
    "adapter_class",
    "cache",
    "fingerprint",
    "plan_from_match",
    "plan_patches",
    "stock_loader",
]
