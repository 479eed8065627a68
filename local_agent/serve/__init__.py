"""`backrest-relay serve`: the HTTP shell Backrest's Docker image triggers with curl.

A thin shell like the CLI and the Lambda handlers: it parses a trigger, decides whether and
where a run may happen, and runs the same `upload` use case the hook runs (docs/docker.md).
Only `app` needs the `serve` extra; `hook` and `security` do not.
"""

SERVE_EXTRA_HINT = (
    "`backrest-relay serve` needs the serve extra (starlette, uvicorn, prometheus-client), "
    "which a plain install does not have: pipx install 'backrest-relay[serve]' (or, in a "
    "virtualenv, pip install 'backrest-relay[serve]')"
)
