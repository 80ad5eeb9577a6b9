"""Causal deltas and the per-context DAG: pure, no I/O."""
