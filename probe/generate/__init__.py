"""Generation: pipeline loading (offline, pre-flight checks), the one diffusers adapter, and executors that turn
batches of Jobs into encoded images. Never touches the run folder or the caches: the driver does.
"""
