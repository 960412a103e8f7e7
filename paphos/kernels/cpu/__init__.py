"""Native CPU kernels (C, built with the system compiler at first use and loaded with ctypes).

Each kernel has a torch reference in paphos.ops; a missing compiler or CPU feature means the
reference runs instead, never an error.
"""
