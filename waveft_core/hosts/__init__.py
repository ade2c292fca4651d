"""What the hosts (ComfyUI, A1111, Forge) run: the weight-adapter class (weight_adapter), the stock trainer's
WaveFT (stock, stock_loader), and the cache of loaded adapters (cache)."""
