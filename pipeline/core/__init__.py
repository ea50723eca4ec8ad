"""Owns what every other package leans on and nothing of the GAN: the errors a user can fix (errors), what a
location may look like (uris), the checkpoint file (checkpoint: atomic save, weights_only load), files checked by
their SHA-256 (files), and pictures as PNG files (pictures).

Imports: nothing
"""
