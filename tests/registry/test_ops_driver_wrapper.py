"""The metrics' timing wrapper stands in for the driver it wraps: every
operation of the contract is its own pass-through, so none falls back to
the contract's generic version (S3's one-GET open_reader did: a blob GET
became a HEAD and a GET again, with metrics on, the default)."""

from __future__ import annotations

import inspect

from registry.ops.metrics import InstrumentedDriver
from storage.driver import StorageDriver


def test_every_driver_operation_is_passed_through():
    operations = {name for name, member in inspect.getmembers(StorageDriver)
                  if not name.startswith("_") and inspect.isfunction(member)}
    assert {"open_reader", "stat_files", "try_lock", "reader"} <= operations
    missing = sorted(name for name in operations if name not in InstrumentedDriver.__dict__)
    assert not missing, f"InstrumentedDriver falls back to StorageDriver's generic {missing}"
