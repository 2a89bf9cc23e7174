"""Methods applied to a model's parameters: pruning at initialisation and (multi-mask) LoRA."""
