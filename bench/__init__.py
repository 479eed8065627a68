"""Side-by-side benchmarks of backrest-relay against `rclone sync` and `s5cmd sync`.

`python -m bench` (or `make bench`) runs the scenarios of issue 8 on a local
`rclone serve s3` and regenerates `docs/benchmarks.md`; `python -m bench.profile` profiles
the agent on one scenario. See `bench/cli.py` for the options. `python -m bench.local_noop`
measures local mode on runs with nothing new (requests and GET bytes at the server).
"""
