"""The embedded stand-ins built in code with seeded random weights (the tiny SD pipeline, its tokenizer and the
tiny CLIP), so every path runs offline.
"""
