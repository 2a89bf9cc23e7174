"""Figure 7: sparse multi-mask vs dense at equal training FLOPs."""
