"""Data → batches for the model: ``open_data`` and what it returns.

``source`` validates and batches; ``readers`` turns stored arrays (.npy, .npz, .pt, synthetic)
into columns; ``images`` decodes a folder of images; ``hook`` streams batches from the user's
own function (``--data pkg.module:function``); ``spec`` is what a command passes along.
"""

from bncheck.data.images import ImageOptions
from bncheck.data.readers import sniff_data
from bncheck.data.source import DataSource, open_data
from bncheck.data.spec import DataSpec

__all__ = ["DataSource", "DataSpec", "ImageOptions", "open_data", "sniff_data"]
