"""Owns the measurements: throughput of the loop alone and under Ray Train (bench) and the data-parallel scaling
model (scaling). Scripts that print tables, not parts of a run.

Imports: core, data, config, gan, eval, tracking, distributed, sweep
"""
