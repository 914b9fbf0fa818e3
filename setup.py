"""The one part setuptools cannot take from pyproject.toml: the C loops of split and reader."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tradebalancer._fastsplit",
            ["tradebalancer/_fastsplit.c"],
            depends=["tradebalancer/_wsframe.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        ),
        Extension(
            "tradebalancer.reader._fastread",
            ["tradebalancer/reader/_fastread.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        ),
    ]
)
