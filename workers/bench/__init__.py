"""Benchmarks of the services (a worker in the loop), as opposed to the library's own in
:mod:`fedbus.bench`."""
