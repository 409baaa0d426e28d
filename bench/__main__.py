"""`python -m bench <subcommand> ...`: the benchmarks' one command.

The parser and its shared argument groups are bench/cli.py's; `python -m bench --help` lists them.
"""

import sys

from bench.cli import main

sys.exit(main())
