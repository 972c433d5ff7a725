"""Samples, image loading, dataset readers and the synthetic task."""

from megatron_ivr.data.readers import DataError, ImageRules, LoadedDataset, read_dataset
from megatron_ivr.data.sample import BadSample, Sample

__all__ = ["BadSample", "DataError", "ImageRules", "LoadedDataset", "Sample", "read_dataset"]
