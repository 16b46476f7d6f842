"""Running: the run folder and its manifest, the driver that plans, executes, logs and scores (the single
writer), and scoring images made elsewhere.
"""
