"""Benchmarks behind ``tpfed bench``: each compares against a baseline measured in the same run."""
