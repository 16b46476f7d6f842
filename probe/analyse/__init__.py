"""Analysis of a run's tables (never a model): aggregates with CIs, paired deltas, bias shares, the one
definition of pairing.
"""
