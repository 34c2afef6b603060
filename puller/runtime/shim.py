"""`python -m puller.runtime.shim BUNDLE`: the keeper of a detached container
(puller.runtime.containers)."""

import sys
from pathlib import Path

from puller.runtime.containers import shim_main

if __name__ == "__main__":
    sys.exit(shim_main(Path(sys.argv[1])))
