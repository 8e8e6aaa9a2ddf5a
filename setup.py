"""The one compiled part: an optional C walk for TIES' magnitude selection.

Everything else is declared in pyproject.toml. Without a C compiler the build goes on
without it and mbuild uses the numpy version of the same walk (mbuild/methods/ranking.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("mbuild.methods._introselect", ["mbuild/methods/_introselect.c"], optional=True),
    ]
)
