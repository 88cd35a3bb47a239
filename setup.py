# cffi cannot yet read cffi_modules from pyproject.toml; everything else lives there.
from setuptools import setup

setup(cffi_modules=["src/useroom/native/_build.py:ffibuilder"])
