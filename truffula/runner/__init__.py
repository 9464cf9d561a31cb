"""Turns scheduled work into device tensors, runs the model and the sampler."""
