"""Owns the measurements and the generated reference: throughput of the loop alone and under Ray Train (bench), the
data-parallel scaling model (scaling), and docs/config.md made from the code (reference). Commands that print
tables or pages, not parts of a run.

Imports: core, data, config, gan, eval, tracking, distributed, sweep
"""
