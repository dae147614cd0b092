"""Data: readers for the real NIH ChestX-ray14 files, splits, the synthetic generator and the
prepared-dataset format (manifest.parquet + pixel shards) that the loaders read.

See docs/data-format.md for the prepared layout.
"""
from medattn.data.labels import DISEASES, NO_FINDING, NIH_LABELS, parse_finding_labels  # noqa: F401
