"""cffi's `cffi_modules` still needs setup.py; all metadata lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["native/build_native.py:ffibuilder"])
