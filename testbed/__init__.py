"""Local stand-ins for the world the agent talks to, shared by tests/ and bench/.

Development only: the wheel ships `local_agent` and `cloud` alone (pyproject), so nothing
here is installed. Nothing here imports pytest, so benchmarks use it as tests do; test-only
helpers (fixtures, skip rules) stay in tests/support.
"""
