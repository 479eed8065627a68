"""`python -m local_agent` runs the CLI (used where the console script is not on PATH)."""

import sys

from local_agent.cli.main import main

sys.exit(main())
