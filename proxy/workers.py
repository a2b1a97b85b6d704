"""Several proxy processes on one port (SO_REUSEPORT), so that a multi-core host scales."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
from collections.abc import Callable

from .config import Config

__all__ = ["run_workers"]

log = logging.getLogger("mdcloud_proxy")


def _reserve_port(host: str) -> socket.socket:
    """A bound, not listening, socket holding a free port that the workers can share."""
    family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    reserve = socket.socket(family, kind, proto)
    reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserve.bind(address)
    return reserve


def run_workers(config: Config, serve: Callable[[Config, int], int]) -> int:
    """Fork ``config.workers`` processes that each run ``serve(config, index)`` on one port.

    Each worker is a whole proxy with its own token, so the token endpoint is asked once
    per worker per token, whatever the traffic. SIGTERM and SIGINT are passed on, and each
    worker drains. If a worker ends on its own, the others are stopped and the exit code is 1:
    whatever supervises the proxy (systemd, Kubernetes) restarts it whole.
    """
    reserve = None
    if config.port == 0:  # the kernel picks a port once, for everybody
        reserve = _reserve_port(config.host)
        config = dataclasses.replace(config, port=reserve.getsockname()[1])
    workers: dict[int, int] = {}
    for index in range(config.workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - measured in the child, which exits here
            if reserve is not None:
                reserve.close()
            code = 1
            try:
                code = serve(config, index)
            finally:
                os._exit(code)
        workers[pid] = index
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in workers:
            os.kill(pid, signal.SIGTERM)

    def reload(_signum: int, _frame: object) -> None:
        for pid in workers:
            os.kill(pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if config.tls_cert_file or config.admin_tls_cert_file:
        signal.signal(signal.SIGHUP, reload)  # each worker reloads its certificates
    result = 0
    while workers:
        pid, status = os.wait()
        if pid not in workers:
            continue
        index = workers.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 or not stopping:
            result = 1
            if not stopping:
                log.error("worker %d (pid %d) ended with %d; stopping the others", index, pid, code)
                stop(signal.SIGTERM, None)
    if reserve is not None:
        reserve.close()
    return result
