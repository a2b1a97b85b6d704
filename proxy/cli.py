"""Command line: parse flags, set up logging, run the proxy, the simulator or the demo."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable, Mapping, Sequence

from aiohttp import web
from yarl import URL

from . import __version__
from .app import create_admin_app, create_app, drain, outbound_route, serve
from .check import check, print_token
from .config import CONFIG_ENV, KEYS, Config, is_loopback, load_config, token_url_for
from .errors import ConfigError, ListenError, describe
from .listener import max_connections, raise_descriptor_limit
from .logs import setup_logging, throttle_loop_errors
from .simulator import Simulator
from .tls import ServerTLS
from .workers import run_workers

__all__ = ["main"]

log = logging.getLogger("mdcloud_proxy")


DEMO_CLIENT_ID = "demo-client"
DEMO_CLIENT_SECRET = "demo-secret"  # noqa: S105 - the simulator's, printed on purpose
DEMO_LIMITS = {"reputation_api": 200, "prevention_api": 20}
DEMO_THROTTLE = (5, 10.0)  # lookups per window of seconds


def _add_flags(parser: argparse.ArgumentParser, default: object, common: bool) -> None:
    """The flags of the declared settings: those also taken after a command, or the others."""
    for spec in KEYS.values():
        if spec.flag is None or spec.on_subcommands != common:
            continue
        parser.add_argument(
            spec.flag,
            dest=spec.key,
            default=default,
            choices=spec.choices,
            metavar=None if spec.choices else spec.flag.removeprefix("--").upper(),
            help=spec.help.replace("%", "%%"),
        )


def _add_common(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--config", metavar="PATH", default=default, help=f"YAML config file (${CONFIG_ENV})"
    )
    _add_flags(parser, default, common=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mdcloud-proxy",
        description="Local authenticating reverse proxy for OPSWAT MetaDefender Cloud.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_common(parser, None)
    _add_flags(parser, None, common=False)
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="turn the quota guard's lookup cache off (cache.enabled: false)",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="run in front of the built-in MetaDefender simulator with short-lived tokens",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in [
        ("check", "check the setup: fetch a token, call GET /v4/apikey/, report; exit 0 or 1"),
        ("token", "print a fresh access token to stdout (for scripts)"),
    ]:
        # SUPPRESS: an option given before the command is not reset by the command's default.
        _add_common(commands.add_parser(name, help=text), argparse.SUPPRESS)
    sim = commands.add_parser(
        "simulator", help="run only the MetaDefender Cloud simulator (for offline integration work)"
    )
    sim.add_argument("--host", dest="sim_host", default="127.0.0.1")
    sim.add_argument("--port", dest="sim_port", type=int, default=9000)
    sim.add_argument("--client-id", default=DEMO_CLIENT_ID)
    sim.add_argument("--client-secret", default=DEMO_CLIENT_SECRET)
    sim.add_argument("--api-key", default=None, help="require this apikey header too")
    sim.add_argument("--token-lifetime", type=float, default=3600.0, help="expires_in, seconds")
    sim.add_argument(
        "--revoke-after",
        type=float,
        default=None,
        help="seconds after which the simulator really refuses a token (< lifetime: early expiry)",
    )
    for kind in ("reputation", "prevention"):
        sim.add_argument(
            f"--limit-{kind}",
            type=int,
            default=4000,
            metavar="N",
            help=f"{kind}_api calls allowed per interval (default 4000)",
        )
    sim.add_argument(
        "--limit-interval",
        type=float,
        default=86400.0,
        metavar="SECONDS",
        help="length of the quota interval, from the first call (default 86400: daily)",
    )
    for kind in ("reputation", "prevention"):
        sim.add_argument(
            f"--throttle-{kind}",
            type=_throttle,
            default=None,
            metavar="N/SECONDS",
            help=f"at most N {kind}_api calls per SECONDS, else 429001 (default: no throttle)",
        )
    return parser


def _throttle(text: str) -> tuple[int, float]:
    """``10/60`` as (10, 60.0): calls per window of seconds."""
    calls, _, seconds = text.partition("/")
    try:
        throttle = int(calls), float(seconds)
    except ValueError:
        throttle = (0, 0.0)
    if throttle[0] < 1 or not throttle[1] > 0:
        raise argparse.ArgumentTypeError(f"expected CALLS/SECONDS such as 10/60, not {text!r}")
    return throttle


def _http_url(host: str, port: int, scheme: str = "http") -> str:
    # An IPv6 address needs brackets in a URL: http://::1:8080 is not one.
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _listen(
    app: web.Application,
    host: str,
    port: int,
    what: str,
    reuse_port: bool = False,
    tls: ServerTLS | None = None,
) -> web.AppRunner:
    context = tls.context if tls is not None else None
    try:
        return await serve(app, host, port, reuse_port=reuse_port, ssl_context=context)
    except OSError as exc:
        raise ListenError(f"cannot listen on {what}{host}:{port}: {describe(exc)}") from None


def _serve(config: Config, worker: int | None = None) -> int:
    """Run one proxy process until SIGTERM or SIGINT; its exit code."""
    # Every request makes many short-lived objects, few of them in cycles: the cyclic
    # collector running every 700 allocations cost about 5% of the CPU per request
    # (bench/). What exists at start-up stays: out of the collector's way.
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    try:
        with asyncio.Runner(loop_factory=_loop_factory(config.loop)) as runner:
            runner.run(_run_proxy(config, worker))
    except ListenError as exc:
        print(f"mdcloud-proxy: {exc}", file=sys.stderr)
        return 1
    return 0


def _listener_tls(config: Config) -> tuple[ServerTLS | None, ServerTLS | None]:
    """The reloadable TLS settings of the main and the admin listener, where configured."""
    main = admin = None
    if config.tls_cert_file is not None and config.tls_key_file is not None:
        main = ServerTLS(
            config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file, name="listen"
        )
    if config.admin_tls_cert_file is not None and config.admin_tls_key_file is not None:
        admin = ServerTLS(config.admin_tls_cert_file, config.admin_tls_key_file, name="admin")
    return main, admin


async def _watch_tls(listeners: list[ServerTLS], interval: float) -> None:
    """Reload a listener's certificate on SIGHUP, and when its files change."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, lambda: [tls.reload() for tls in listeners])
    try:
        while True:
            await asyncio.sleep(interval)
            for tls in listeners:
                tls.reload_if_changed()
    finally:
        loop.remove_signal_handler(signal.SIGHUP)


def _via(config: Config) -> str:
    """How the upstream is reached, for the start-up line: never the proxy's credentials."""
    hop = outbound_route(config)(URL(config.upstream_url))
    return f" through outbound proxy {hop.shown} (from {hop.source})" if hop is not None else ""


async def _run_proxy(config: Config, worker: int | None = None) -> None:
    throttle_loop_errors(asyncio.get_running_loop())
    app = create_app(config)
    shared = worker is not None  # workers share their ports
    tls, admin_tls = _listener_tls(config)
    if tls is None and config.inbound_keys and not is_loopback(config.host):
        log.warning(
            "listen.host %s is not loopback and the listener speaks plain HTTP: inbound keys "
            "and answers travel in clear; set listen.tls_cert_file and listen.tls_key_file",
            config.host,
        )
    runner = await _listen(app, config.host, config.port, "", shared, tls)
    admin = None
    reloading = [each for each in (tls, admin_tls) if each is not None]
    watcher = None
    if reloading:
        watcher = asyncio.create_task(_watch_tls(reloading, config.tls_reload_interval))
    try:
        if config.admin_port is not None:
            admin = await _listen(
                create_admin_app(app),
                config.admin_host,
                config.admin_port,
                "admin ",
                shared,
                admin_tls,
            )
        log.info(
            "%smdcloud-proxy %s listening on %s, forwarding to %s%s (%s event loop, "
            "open-file limit %d, at most %d connections)",
            f"worker {worker} (pid {os.getpid()}): " if shared else "",
            __version__,
            _http_url(config.host, runner.addresses[0][1], "https" if tls else "http"),
            config.upstream_url,
            _via(config),
            type(asyncio.get_running_loop()).__module__.split(".")[0],
            resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            max_connections(runner),
        )
        if admin is not None:
            scheme = "https" if admin_tls else "http"
            log.info(
                "health and metrics on %s/-/",
                _http_url(config.admin_host, admin.addresses[0][1], scheme),
            )
        await _wait_for_signal()
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        await drain(runner, config.shutdown_timeout)
        if admin is not None:
            await admin.cleanup()  # last, so that health and metrics stay up while draining
    log.info("stopped")


async def _run_simulator(sim: Simulator, host: str, port: int) -> None:
    runner = await serve(sim.app(), host, port)
    log.info(
        "MetaDefender Cloud simulator on http://%s:%d (client id %r, token lifetime %.0f s; "
        "per %g s: reputation %d, prevention %d%s)",
        host,
        runner.addresses[0][1],
        sim.client_id,
        sim.token_lifetime,
        sim.limit_interval,
        sim.limits["reputation_api"],
        sim.limits["prevention_api"],
        "".join(f"; {kind} throttled to {n}/{s:g} s" for kind, (n, s) in sim.throttles.items()),
    )
    try:
        await _wait_for_signal()
    finally:
        await runner.cleanup()


async def _run_demo(flags: Mapping[str, object]) -> None:
    # Checked before anything starts, like any configuration.
    account = {"oauth.client_id": DEMO_CLIENT_ID, "oauth.client_secret": DEMO_CLIENT_SECRET}
    config = load_config(environ={}, overrides={**flags, **account})
    # Tokens live 60 s but the simulator drops them after 20 s, so within a minute of
    # use the proxy shows both a refresh ahead of expiry and an expired-token replay. A small
    # account with a throttle on lookups, so that /-/ has bars and the log shows a wait.
    sim = Simulator(
        DEMO_CLIENT_ID,
        DEMO_CLIENT_SECRET,
        token_lifetime=60,
        revoke_after=20,
        limits=dict(DEMO_LIMITS),
        throttles={"reputation_api": DEMO_THROTTLE},
    )
    sim_runner = await serve(sim.app(), "127.0.0.1", 0)
    try:
        upstream = f"http://127.0.0.1:{sim_runner.addresses[0][1]}"
        config = dataclasses.replace(
            config, upstream_url=upstream, token_url=token_url_for(upstream)
        )
        proxy_runner = await _listen(create_app(config), config.host, config.port, "")
        try:
            _print_demo_help(_http_url(config.host, proxy_runner.addresses[0][1]), upstream)
            await _wait_for_signal()
        finally:
            await proxy_runner.cleanup()
    finally:
        await sim_runner.cleanup()


def _print_demo_help(base: str, upstream: str) -> None:
    calls, window = DEMO_THROTTLE
    print(
        f"""
mdcloud-proxy demo: the proxy on {base} forwards to a local MetaDefender Cloud simulator
at {upstream}. Tokens are announced for 60 s but refused by the simulator after 20 s, so
the log below shows the proxy refreshing and replaying. Try, in another terminal:

  curl {base}/v4/apikey/
  echo 'hello' > sample.txt
  curl -X POST --data-binary @sample.txt -H 'filename: sample.txt' {base}/v4/file
  curl {base}/v4/file/<data_id from the answer above>
  curl -i {base}/v4/hash/<sha256 from the answer above>
  curl -i {base}/v4/hash/<the same sha256 again>
  for i in 1 2 3 4 5 6 7; do curl -s {base}/v4/ip/192.0.2.$i; echo; done

None of these carries a credential: the proxy adds the bearer token. The repeated lookup
is answered by the quota guard (X-Cache-Status: HIT): it costs no quota. The account allows
{calls} lookups per {window:.0f} s: the loop's last lookups wait for the throttle instead of
failing (see the log). {base}/-/ shows the quota left. Ctrl-C stops the demo.
""",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mdcloud-proxy`` command."""
    args = _parser().parse_args(argv)
    try:
        return _command(args)
    except ConfigError as exc:
        print(f"mdcloud-proxy: configuration error: {exc}", file=sys.stderr)
        return 2
    except ListenError as exc:  # the demo's
        print(f"mdcloud-proxy: {exc}", file=sys.stderr)
        return 1


def _command(args: argparse.Namespace) -> int:
    flags = {spec.key: getattr(args, spec.key, None) for spec in KEYS.values() if spec.flag}
    if getattr(args, "no_cache", False):
        flags["cache.enabled"] = False
    if args.command == "simulator" or args.demo:
        level, format_ = flags["log.level"], flags["log.format"]
        setup_logging(str(level or Config.log_level), str(format_ or Config.log_format))
        if args.command == "simulator":
            throttles = {
                f"{kind}_api": getattr(args, f"throttle_{kind}")
                for kind in ("reputation", "prevention")
                if getattr(args, f"throttle_{kind}") is not None
            }
            sim = Simulator(
                args.client_id,
                args.client_secret,
                api_key=args.api_key,
                token_lifetime=args.token_lifetime,
                revoke_after=args.revoke_after,
                limits={  # the other limit types keep the simulator's default
                    "reputation_api": args.limit_reputation,
                    "prevention_api": args.limit_prevention,
                },
                limit_interval=args.limit_interval,
                throttles=throttles,
            )
            asyncio.run(_run_simulator(sim, args.sim_host, args.sim_port))
        else:
            asyncio.run(_run_demo(flags))
        return 0
    config = load_config(args.config, os.environ, flags)
    setup_logging(config.log_level, config.log_format)
    if args.command == "check":
        return 0 if asyncio.run(check(config, sys.stdout)) else 1
    if args.command == "token":
        return 0 if asyncio.run(print_token(config, sys.stdout, sys.stderr)) else 1
    raise_descriptor_limit()  # before any fork: workers inherit it
    if config.workers == 1:
        return _serve(config)
    _loop_factory(config.loop)  # a missing uvloop is a configuration error, before the fork
    return run_workers(config, _serve)


def _loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when asked for or, with "auto", when it is installed; else asyncio's."""
    if kind == "asyncio":
        return None
    try:
        import uvloop  # a dependency wherever it exists (not on Windows, not on PyPy)
    except ImportError:
        if kind == "uvloop":
            raise ConfigError(
                "loop: uvloop is not installed here (pip install uvloop), or use loop: asyncio"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
