"""The one part setuptools cannot take from pyproject.toml: the C extension of split.py."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tradebalancer._fastsplit",
            ["tradebalancer/_fastsplit.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        )
    ]
)
