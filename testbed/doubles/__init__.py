"""In-memory stand-ins for the ports of `cloud.logic.ports` that tests and `bench/` share
(the verification simulator drives the real Lambda shells over them)."""
