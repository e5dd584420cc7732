"""Build script: the pure-Python package (the CUDA extension hooks in here, see CMakeLists.txt)."""

from setuptools import setup

setup()
