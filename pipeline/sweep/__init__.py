"""Owns a Ray Tune sweep: its checks (checks), the search space (search_space), the scheduler registry
(schedulers), the sweep's driver (tune), one trial (trial), what a sweep tells its user (report), where its hardware
time went (accounting), and Tune's private APIs (tune_internals). The only package that imports ray.tune.

Imports: core, data, config, gan, eval, tracking, distributed
"""
