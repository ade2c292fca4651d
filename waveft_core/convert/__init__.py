"""Conversions: PEFT folders and diffusers files (peft_io, sources), LoRA in and out (lora, extract), and
merging an adapter into a checkpoint (merge)."""
