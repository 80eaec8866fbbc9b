"""vlmsec: a security test bench for vision-language models."""

__version__ = "0.1.0"
