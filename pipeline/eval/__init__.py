"""Owns how generated images are scored: the metric registry, one entry per metric and the only place their names
are spelt (metrics), the maths (scores), the dataset's classifier whose features they use (classifier), the cached
evaluator (evaluator) and what the loop asks when a report is scored (scoring).

Imports: core, data, config, gan
"""
