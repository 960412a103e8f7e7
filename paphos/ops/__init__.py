"""Ops: one file per op, each a readable torch reference (the CPU path and the test oracle).

`paphos.ops.registry.pick(name, device)` returns the fastest implementation for a device, chosen
once at start-up by the runner; on CPU that is always the reference here.
"""
