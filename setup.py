# The CFFI extension (tpfed.compute._native) is declared here: setuptools takes `cffi_modules` only
# through setup(). Everything else lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["host/tpfed/compute/_build_native.py:ffibuilder"])
