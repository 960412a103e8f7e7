"""Ops: one file per op, each a readable torch reference (the test oracle and the fallback).

`paphos.ops.registry.pick(name, device_type)` returns the fastest implementation for a device,
chosen once when a layer is built: Triton kernels on CUDA, the C kernels of `paphos.kernels.cpu`
on CPU where they built, else the reference here.
"""
