"""Owns the GAN: its networks (models), one training step (steps), what a run continues from (state), the loop
`train_gan` (loop), what it reports (reports) and the hooks that hear it (hooks), and images from a generator
(sampling). It knows nothing of Ray or MLflow: its caller gives it a runtime, hooks and a scorer.

Imports: core, data, config
"""
