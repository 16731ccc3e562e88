"""Numba kernels on plain arrays: quantisation, fused fold-in, server optimizer steps.

Everything here is ``@njit(cache=True, nogil=True)``: compiled once per machine and
signature, cached beside the source, and free to run on a worker thread while the event
loop keeps receiving.
"""
