"""Compiled kernels of cnet: no framework logic, no Python-level state.

One module per kernel family; each exposes ``def`` wrappers that validate
shapes, dtypes and contiguity and then call ``noexcept nogil`` kernels.
"""
