"""Dockyard's test suite.

A package so that test modules and the benchmarks import the shared support
code as `tests.support.<module>`: pytest puts the checkout on `sys.path`
(`pythonpath` in pyproject.toml), no test edits `sys.path` itself. The
benchmarks, run as scripts, have the one bootstrap (tests/benchmarks/_common.py).
"""
