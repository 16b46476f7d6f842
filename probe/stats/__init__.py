"""Statistics with no I/O: the prompt-clustered bootstrap and the delete-a-group jackknife that every interval in
probe comes from.
"""
