import sys

from benchmarks.overhead.cli import main

sys.exit(main())
