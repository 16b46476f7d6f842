"""The Monk Skin Tone scale (Monk 2019; Google's MST, skintone.google): the one table of its ten tones.

The skin_tone metric maps faces to the nearest swatch, the bias tables count its labels, and the report
draws its distributions in these colours; all three read them here.
"""

from __future__ import annotations

#: The published swatches, tone 1 (lightest) to 10.
MONK_HEX: tuple[str, ...] = ("#f6ede4", "#f3e7db", "#f7ead0", "#eadaba", "#d7bd96",
                             "#a07e56", "#825c43", "#604134", "#3a312a", "#292420")

#: The labels the skin_tone metric writes, lightest to darkest.
MONK_TONES: tuple[str, ...] = tuple(f"monk_{i}" for i in range(1, len(MONK_HEX) + 1))
