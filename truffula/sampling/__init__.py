"""Sampling parameters, their device-side batch and the sampler."""

from truffula.sampling.params import SamplingParams

__all__ = ["SamplingParams"]
