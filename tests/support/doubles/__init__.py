"""Test doubles for the ports of `cloud.logic.ports`, kept out of the installed wheel."""
