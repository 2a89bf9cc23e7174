"""Figure 5: multi-mask vs same-mask over depth, density and FLOPs."""
