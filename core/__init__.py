"""PEFT Studio's engine: a small PEFT library on torch + transformers, usable without the studio."""

__version__ = "0.1.0"
