"""Pruning-DEQ: scored vs random masks on monotone DEQs and the tied block."""
