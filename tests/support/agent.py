"""Compatibility re-exports: this lives in `testbed.agent` (shared with bench/). Import from
there; this module goes once no branch imports it."""

from testbed.agent import (
    ROOT,
    AgentResult,
    agent_command,
    agent_env,
    remote_etags,
    remote_keys,
    run_agent,
    slow_directory_reads,
    start_agent,
    unfinished_upload_ids,
    unfinished_uploads,
    write_agent_config,
)

__all__ = [
    "ROOT",
    "AgentResult",
    "agent_command",
    "agent_env",
    "remote_etags",
    "remote_keys",
    "run_agent",
    "slow_directory_reads",
    "start_agent",
    "unfinished_upload_ids",
    "unfinished_uploads",
    "write_agent_config",
]
