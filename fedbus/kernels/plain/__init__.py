"""The NumPy backend: the same functions as :mod:`fedbus.kernels.jit`, written as whole-array
NumPy expressions, so a device (or any install without the ``worker`` extra) encodes, decodes
and aggregates without Numba. Results agree with the Numba kernels to float rounding;
stochastic rounding draws from NumPy's generator instead of Numba's, so the bytes differ for
the same seed while the error bounds are the same."""
