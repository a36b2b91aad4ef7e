"""Subcommands of the ``tpfed`` CLI, one module each (see :mod:`tpfed.cli`)."""
