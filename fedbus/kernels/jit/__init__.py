"""The Numba backend: ``@njit(cache=True, nogil=True)`` loops, compiled once per machine and
signature, cached beside the source, free to run on a worker thread while the event loop
keeps receiving. Importing this package imports Numba."""
