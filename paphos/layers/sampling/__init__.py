"""Batched sampler steps of `paphos.layers.sampler`: each a tensor op over the rows using it."""
