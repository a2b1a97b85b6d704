# mdcloud-proxy as a container: two stages, the runtime keeps only the virtualenv.
#   docker build -t mdcloud-proxy .
#   docker run -p 127.0.0.1:8080:8080 -e MDCLOUD_CLIENT_ID=... -e MDCLOUD_CLIENT_SECRET=... mdcloud-proxy
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN python3 -m venv /opt/mdcloud-proxy \
    && /opt/mdcloud-proxy/bin/pip install --no-cache-dir --disable-pip-version-check .

FROM ${BASE_IMAGE}
COPY --from=build /opt/mdcloud-proxy /opt/mdcloud-proxy
# Inside a container the proxy must listen on all interfaces to be reachable through a
# published port or from the other containers of a pod; publish it on 127.0.0.1 on the host.
# Anyone who reaches it acts as the MetaDefender account, so by default only loopback and
# private addresses (container networks, pods) may use it; override the list, or add
# MDCLOUD_PROXY_INBOUND_KEYS, for anything wider.
ENV PATH=/opt/mdcloud-proxy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MDCLOUD_PROXY_LISTEN_HOST=0.0.0.0 \
    MDCLOUD_PROXY_LISTEN_PORT=8080 \
    MDCLOUD_PROXY_INBOUND_ALLOWED_NETWORKS=127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10,fc00::/7
# No user database entry is needed to run as an unprivileged user.
USER 10001:10001
EXPOSE 8080
# Python, not curl: slim images have no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/-/healthy' % os.environ.get('MDCLOUD_PROXY_LISTEN_PORT', '8080'), timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["mdcloud-proxy"]
