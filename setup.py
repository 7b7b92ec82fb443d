"""Build script. Pure-Python install for now; native extensions are added by the CUDA/C++ backend."""
from setuptools import setup

setup()
