"""`python -m bench`: run the benchmarks and regenerate docs/benchmarks.md."""

from bench.cli import main

raise SystemExit(main())
