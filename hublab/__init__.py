"""hublab: a mixture of real expert language models on a Raspberry Pi."""

__version__ = "0.1.0"
