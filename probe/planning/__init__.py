"""Planning: the Job record and its key, the planner that expands a suite into jobs, and model pinning (branches
to commits, local folders to content hashes). No torch.
"""
