"""SPIN parameter sharing: layer-to-weight maps, their parameter view in the tie, model options."""
