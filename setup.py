"""The one compiled part: optional C loops for TIES (the magnitude selection walk and the
sum-consensus combine), linear (the weighted sum in one pass) and SLERP (its dot and last pass).

Everything else is declared in pyproject.toml. Without a C compiler the build goes on
without it and mbuild runs the same steps in numpy and torch, with the same bytes.
"""

import sys

from setuptools import Extension, setup

# Products and sums stay separately rounded, as torch's element-wise ops are: no fused
# multiply-add (compilers may contract `a + b * c` into one on ARM, or with -march flags).
# Where torch does fuse (addcmul_), the C code calls fmaf explicitly.
# No trapping math: comparisons may then be vectorized; it changes no result, only whether
# a floating-point exception could trap (none is enabled).
FLAGS = [] if sys.platform == "win32" else ["-ffp-contract=off", "-fno-trapping-math"]

setup(
    ext_modules=[
        Extension(
            "mbuild.methods._kernels",
            ["mbuild/methods/_kernels.c"],
            extra_compile_args=FLAGS,
            optional=True,
        ),
    ]
)
