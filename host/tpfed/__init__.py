"""tpfed: one transformer across many small, unequal devices."""

__version__ = "0.1.0"
