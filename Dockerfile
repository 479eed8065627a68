# backrest-relay serve: the sidecar Backrest's own image triggers with curl (docs/docker.md).
# tests/infra/test_docker.py runs this file's install step, ENV, ENTRYPOINT and HEALTHCHECK
# in a virtualenv, and hadolint lints it (make lint): keep each instruction on one line.
FROM python:3.12.8-slim-bookworm AS build
RUN pip install --no-cache-dir uv==0.13.8
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
COPY local_agent/ local_agent/
COPY cloud/ cloud/
COPY scripts/docker-install.sh scripts/
RUN sh scripts/docker-install.sh /opt/backrest-relay

FROM python:3.12.8-slim-bookworm
COPY --from=build /opt/backrest-relay /opt/backrest-relay
RUN groupadd --system --gid 1000 relay && useradd --system --uid 1000 --gid relay --home-dir /state --no-create-home relay && mkdir /state && chown relay:relay /state
ENV PATH=/opt/backrest-relay/bin:$PATH XDG_STATE_HOME=/state BACKREST_RELAY_SERVE__LISTEN=0.0.0.0:8787 PYTHONUNBUFFERED=1
USER 1000:1000
WORKDIR /state
VOLUME ["/state"]
EXPOSE 8787
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8787/healthz', timeout=4)"]
ENTRYPOINT ["backrest-relay", "serve"]
