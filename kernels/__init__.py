"""Custom C++/CUDA ops of v2d and their pure-torch references.

Public entry: `kernels.ops`. `kernels.reference` holds readable torch versions of every op.
This package depends on torch only.
"""
