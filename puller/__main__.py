import sys

from puller.cli import main

sys.exit(main())
