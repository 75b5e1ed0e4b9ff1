"""Stage: one module per pipeline agent (clean, window, predict, alert, sink), the worker that
hosts clean and window, and the numba kernels they run."""
