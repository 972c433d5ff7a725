"""The synthetic visual-reasoning task: scenes, question families, reference responses."""

from megatron_ivr.data.synthetic.generate import generate_dataset

__all__ = ["generate_dataset"]
