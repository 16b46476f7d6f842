"""Storage: the one atomic-write helper, the content-addressed image store, the feature and score caches, and the
run tables' parquet files.
"""
