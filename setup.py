"""Build script: compiles the Cython hot path in dynapm/_fast."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "dynapm._fast.heads",
        ["dynapm/_fast/heads.pyx"],
        extra_compile_args=["-O2"],
    ),
    Extension(
        "dynapm._fast.proxy",
        ["dynapm/_fast/proxy.pyx"],
        extra_compile_args=["-O2"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
        },
    ),
)
