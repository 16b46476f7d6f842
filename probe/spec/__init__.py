"""The suite contract: schema, YAML with line numbers, loading and semantic checks, the metric catalog, presets
and shipped datasets. Pure data and validation: nothing here imports torch.
"""
