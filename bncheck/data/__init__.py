"""Data → batches for the model: ``open_data`` and what it returns.

``source`` validates and batches; ``readers`` turns stored arrays (.npy, .npz, .pt, synthetic)
into columns; ``images`` decodes a folder of images.
"""

from bncheck.data.images import ImageOptions
from bncheck.data.readers import sniff_data
from bncheck.data.source import DataSource, open_data

__all__ = ["DataSource", "ImageOptions", "open_data", "sniff_data"]
