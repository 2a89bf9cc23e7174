"""Figure 2 / Table 1a: weight-tied vs DEQ, accuracy vs runtime."""
