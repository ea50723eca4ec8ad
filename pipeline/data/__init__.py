"""Owns the data a run trains on: one DataSource per kind of data (source; the IDX datasets in idx, a folder of
images in folder; which one a config names in kinds), the datasets' specs (specs), preparing a folder into shards
(images) and reading them back (shards), and where a worker's batches come from (batches). Nothing outside this
package branches on the kind of data.

Imports: core
"""
