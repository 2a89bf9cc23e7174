"""Figure 8: width vs weight-tied depth."""
