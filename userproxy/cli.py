"""The `userproxy` command. Thin: flags -> settings -> the async library entry points on uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import click
import structlog
import uvloop

from userproxy import __version__, logs
from userproxy.durations import parse_duration
from userproxy.ports import parse_port_range
from userproxy.settings import ProxySettings, SettingsError, default_node_name

log = structlog.get_logger("userproxy.cli")


class Duration(click.ParamType[float]):
    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float | int):
            return float(value)
        try:
            return parse_duration(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


DURATION = Duration()


def run_async(main: Coroutine[Any, Any, int]) -> int:
    """Run `main` on uvloop until it returns or SIGINT/SIGTERM arrives (then cancel it)."""

    async def guarded() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await main
        except asyncio.CancelledError:
            log.info("Stopping on signal.")
            return 0

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(guarded())


def common_logging(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "-v",
        "--verbose",
        "verbosity",
        count=True,
        help="More detail: -v info, -vv debug (klog-style levels).",
    )(f)
    f = click.option(
        "--log-format",
        type=click.Choice(["auto", "console", "json"]),
        default="auto",
        show_default=True,
        help="auto: console on a terminal, JSON otherwise.",
    )(f)
    return f


@click.group()
@click.version_option(__version__, prog_name="userproxy")
def main() -> None:
    """A userspace TCP/UDP load-balancing proxy for Kubernetes Services."""


@main.command()
@click.option(
    "--manifests",
    type=click.Path(path_type=Path),
    help="A file or directory of Service / EndpointSlice / Endpoints YAML to serve.",
)
@click.option(
    "--bind-address",
    default="0.0.0.0",
    show_default=True,
    help="The address the proxy ports listen on (loopback is refused).",
)
@click.option(
    "--proxy-port-range",
    default="",
    help="Proxy ports: begin-end, a single port or begin+offset; empty = kernel-chosen.",
)
@click.option(
    "--udp-timeout",
    type=DURATION,
    default="250ms",
    show_default=True,
    help="Idle time after which a UDP flow ends (must be > 0).",
)
@click.option(
    "--iptables-sync-period",
    type=DURATION,
    default="30s",
    show_default=True,
    help="The longest time between two syncs.",
)
@click.option(
    "--iptables-min-sync-period",
    type=DURATION,
    default="1s",
    show_default=True,
    help="The shortest time between two syncs.",
)
@click.option(
    "--hostname-override", default="", help="This node's name (for internalTrafficPolicy: Local)."
)
@click.option(
    "--service-proxy-name",
    default=None,
    help="Serve only Services labelled service.kubernetes.io/service-proxy-name=NAME.",
)
@common_logging
def run(**options: Any) -> None:
    """Run the proxy."""
    logs.configure(verbosity=options["verbosity"], fmt=options["log_format"])
    try:
        settings = settings_from_options(options)
    except (SettingsError, ValueError) as err:
        raise click.UsageError(str(err)) from None
    if options["manifests"] is None:
        raise click.UsageError("give --manifests PATH (a file or directory of Kubernetes YAML)")
    from userproxy.main import serve_manifests

    sys.exit(
        run_async(
            serve_manifests(
                settings, options["manifests"], proxy_name=options["service_proxy_name"]
            )
        )
    )


def settings_from_options(options: dict[str, Any]) -> ProxySettings:
    return ProxySettings(
        bind_address=options["bind_address"],
        port_range=parse_port_range(options["proxy_port_range"]),
        udp_idle_timeout=options["udp_timeout"],
        sync_period=options["iptables_sync_period"],
        min_sync_period=options["iptables_min_sync_period"],
        node_name=(options["hostname_override"] or default_node_name()).lower(),
    )


@main.command()
@click.option("--connections", default=9, show_default=True, help="Connections per round.")
def demo(connections: int) -> None:
    """Balance real connections across three local backends, from a manifest, no cluster."""
    logs.configure(verbosity=0, fmt="console")
    logging.getLogger().setLevel(logging.WARNING)  # the demo narrates; only problems are logged
    from userproxy.demo import run_demo

    async def go() -> int:
        await run_demo(connections=connections, say=click.echo)
        return 0

    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(run_async(go()))
