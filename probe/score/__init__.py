"""Scoring: the metric protocol, the scoring pass that writes score rows, and the metrics themselves
(score/metrics/).
"""
