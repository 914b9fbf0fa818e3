"""The worker library's C loop: the one part setuptools cannot take from pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tradebalancer.reader._fastread",
            ["src/tradebalancer/reader/_fastread.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        )
    ]
)
