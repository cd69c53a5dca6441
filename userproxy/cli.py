"""The `userproxy` command. Thin: flags -> settings -> the async library entry points on uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
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
@click.option(
    "--portals",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Install the iptables portals (ClusterIP/NodePort interception); auto: on as root.",
)
@click.option(
    "--iptables-backend",
    type=click.Choice(["auto", "legacy", "nft"]),
    default="auto",
    show_default=True,
    help="legacy: python-iptables; nft: iptables-nft-restore; auto: follow the host.",
)
@click.option(
    "--nodeport-addresses",
    multiple=True,
    help="CIDRs (comma-separated or repeated) whose addresses answer NodePorts.",
)
@click.option("--cleanup", is_flag=True, help="Remove userproxy's iptables rules and exit.")
@common_logging
def run(**options: Any) -> None:
    """Run the proxy."""
    logs.configure(verbosity=options["verbosity"], fmt=options["log_format"])
    if options["cleanup"]:
        sys.exit(do_cleanup())
    try:
        settings = settings_from_options(options)
        portal_config = portal_config_from_options(options, settings)
    except (SettingsError, ValueError) as err:
        raise click.UsageError(str(err)) from None
    if options["manifests"] is None:
        raise click.UsageError("give --manifests PATH (a file or directory of Kubernetes YAML)")
    from userproxy.main import serve_manifests

    job = serve_manifests(
        settings,
        options["manifests"],
        proxy_name=options["service_proxy_name"],
        portal_config=portal_config,
        iptables_backend=options["iptables_backend"],
    )
    sys.exit(run_async(job))


def portal_config_from_options(options: dict[str, Any], settings: ProxySettings) -> Any:
    """The portal settings, or None when portals are off."""
    wanted = options["portals"]
    if wanted == "off" or (wanted == "auto" and os.geteuid() != 0):
        if wanted == "auto":
            log.warning("Not root: running without portals; connect to the proxy ports.")
        return None
    from userproxy.portals.manager import detect_host_ip
    from userproxy.portals.rules import PortalConfig

    cidrs = tuple(
        str(ipaddress.ip_network(cidr.strip(), strict=False))
        for value in options["nodeport_addresses"]
        for cidr in value.split(",")
        if cidr.strip()
    )
    host_ip = detect_host_ip() if settings.wildcard_bind else settings.bind_address
    return PortalConfig(bind_address=settings.bind_address, host_ip=host_ip, nodeport_cidrs=cidrs)


def do_cleanup() -> int:
    from userproxy.portals.backends import RulesError, cleanup

    try:
        removed = cleanup()
    except RulesError as err:
        log.error("Cleanup failed.", reason=str(err))
        return 1
    message = "Removed userproxy's iptables rules." if removed else "Nothing to clean up."
    log.info(message, removed=removed)
    return 0


@main.command("cleanup")
@common_logging
def cleanup_command(verbosity: int, log_format: Any) -> None:
    """Remove every userproxy chain and jump rule (legacy and nft); safe to repeat."""
    logs.configure(verbosity=verbosity, fmt=log_format)
    sys.exit(do_cleanup())


@main.command()
def rules() -> None:
    """Print the iptables rules userproxy owns, in iptables-save form."""
    from userproxy.portals.backends import owned_rules_text

    click.echo(owned_rules_text(), nl=False)


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
