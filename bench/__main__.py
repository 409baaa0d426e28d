"""`python -m bench <subcommand> ...`: the benchmarks' one command (bench/cli.py)."""

import sys

from bench.cli import main

sys.exit(main())
