"""Figure 6: layer CKA and per-reuse linear probes, same- vs multi-mask."""
