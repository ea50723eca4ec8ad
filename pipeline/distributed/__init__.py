"""Owns how a run's workers run and how a run is tracked from the driver: one tracked run (run), everything before it
starts (prepare; a folder's shards made as Ray tasks: prepare_tasks), its MLflow record (lifecycle) and its
registration (registration), the workers as a Ray Train run (train_run; a sweep's trial may run its one worker in
its own process: pipeline.sweep.trial), what a worker does (worker) with its hooks (hooks) and its preemption watch
(preemption), the report path's encoding and its driver end (results), what workers need of the cluster
(resources), where runs live (storage), elastic shares (elastic), and Ray's start-up, console filter and private
APIs (ray_runtime, console). The only package that imports ray.train.

Imports: core, data, config, gan, eval, tracking
"""
