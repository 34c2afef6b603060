"""Dockyard's test suite.

A package so that test modules and the benchmarks import the shared support
code as `tests.support.<module>`: pytest puts the checkout on the import
path (`pythonpath` in pyproject.toml) and no test changes that path itself.
The benchmarks, run as scripts, have the one bootstrap (tests/benchmarks/_common.py).
"""
