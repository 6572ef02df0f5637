"""Numba kernels of fededge: pure functions over contiguous typed arrays (imported as fededge.native)."""
