"""The `userproxy` command. Thin: flags -> settings -> the async library entry points on uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import click
import structlog
import uvloop

from userproxy import __version__, config, logs, modes
from userproxy import settings as settings_module
from userproxy.durations import parse_duration
from userproxy.settings import SettingsError

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
        help="More detail: -v every port and change (debug), -vv also the API client's.",
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
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A KubeProxyConfiguration file; flags given on the command line override it.",
)
@click.option(
    "--write-config-to",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the effective configuration (file and flags) there ('-': stdout) and exit.",
)
@click.option(
    "--manifests",
    type=click.Path(path_type=Path),
    help="Serve a file or directory of Service / EndpointSlice / Endpoints YAML (no cluster).",
)
@click.option("--kubeconfig", default="", help="Follow the API server of this kubeconfig.")
@click.option(
    "--master", default="", help="The API server URL (overrides the kubeconfig's server)."
)
@click.option(
    "--use-endpoints",
    is_flag=True,
    help="Watch core/v1 Endpoints instead of EndpointSlices (clusters older than 1.21).",
)
@click.option(
    "--proxy-mode",
    type=click.Choice(list(modes.MODES)),
    default="userspace",
    show_default=True,
    help="userspace: listeners relay the traffic; iptables, nftables: kernel rules only (root).",
)
@click.option(
    "--masquerade-all",
    is_flag=True,
    help="iptables mode: SNAT all service traffic (else only external and hairpin).",
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
    help="Proxy ports: begin-end, a single port or begin+offset; empty = the ephemeral range.",
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
    help="The longest time between two syncs (and between full rewrites of the rules).",
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
    "--healthz-bind-address",
    default="0.0.0.0:10256",
    show_default=True,
    help="host:port of /healthz and /livez; empty disables.",
)
@click.option(
    "--metrics-bind-address",
    default="127.0.0.1:10249",
    show_default=True,
    help="host:port of /metrics, /proxyMode, /configz and /status (userproxy ls); empty disables.",
)
@click.option(
    "--bind-address-hard-fail",
    is_flag=True,
    help="Exit if the health or metrics server cannot bind (else log and go on).",
)
@click.option(
    "--portals",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Install the iptables portals (ClusterIP/NodePort interception); auto: on as root.",
)
@click.option(
    "--portals-backend",
    type=click.Choice(["auto", "iptables", "nftables"]),
    default="auto",
    show_default=True,
    help="Where portals are written; auto: nftables if the host uses it natively, else iptables.",
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
@click.option(
    "--service-node-port-range",
    default="30000-32767",
    show_default=True,
    help="NodePorts from manifests must fall in it (as the API server's flag); empty: any.",
)
@click.option(
    "--external-ip-cidrs",
    multiple=True,
    help="CIDRs (comma-separated or repeated) Service externalIPs must fall in; a node "
    "address is served as an externalIP only when listed. Empty: any other address.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Processes serving the data plane (SO_REUSEPORT; a client IP stays on one).",
)
@click.option("--cleanup", is_flag=True, help="Remove userproxy's iptables rules and exit.")
@click.option(
    "--node-zone",
    default="",
    help="This node's zone for topology-aware routing (default: the Node's "
    "topology.kubernetes.io/zone label, read from the API server).",
)
@click.option(
    "--drain-timeout",
    type=DURATION,
    default="25s",
    show_default=True,
    help="After a hand-over, how long established connections and flows may run on.",
)
@click.option(
    "--successor-wait",
    type=DURATION,
    default="0s",
    show_default=True,
    help="On SIGTERM, serve on this long for a successor to take over, then exit leaving "
    "the rules (0: remove the rules and exit).",
)
@click.option(
    "--take-over/--no-take-over",
    default=True,
    show_default=True,
    help="If another userproxy manages this node, take over its sockets (a restart with no "
    "dropped connection); --no-take-over refuses to start instead.",
)
@click.option(
    "--linger-after-handover",
    is_flag=True,
    help="After a hand-over and drain, wait for SIGTERM instead of exiting (in a pod).",
)
@click.option(
    "--instance-lock/--no-instance-lock",
    default=True,
    show_default=True,
    help="Refuse to start while another userproxy manages this node's rules (/run/userproxy).",
)
@common_logging
@click.pass_context
def run(ctx: click.Context, /, **options: Any) -> None:
    """Run the proxy: on --manifests, or following the API server (--kubeconfig, --master,
    or the in-cluster service account when neither is given)."""
    logs.configure(verbosity=options["verbosity"], fmt=options["log_format"])
    if options["cleanup"]:
        sys.exit(do_cleanup())
    raise_open_files_limit()
    tune_garbage_collector()
    try:
        options = merge_config_file(ctx, options)
        settings = settings_module.from_options(options)
    except (SettingsError, ValueError, OSError) as err:
        raise click.UsageError(str(err)) from None
    from userproxy.main import configz, serve

    if options["write_config_to"] is not None:
        text = config.dump(configz(settings))
        if str(options["write_config_to"]) == "-":
            click.echo(text, nl=False)
        else:
            options["write_config_to"].write_text(text)
            log.info("Wrote the configuration.", path=str(options["write_config_to"]))
        sys.exit(0)
    connection = settings.client_connection
    if not (
        settings.sources.manifests
        or connection.kubeconfig
        or connection.master
        or os.environ.get("KUBERNETES_SERVICE_HOST")
    ):
        raise click.UsageError(
            "give --manifests PATH, --kubeconfig FILE or --master URL "
            "(or run in a pod, with the in-cluster service account)"
        )
    sys.exit(run_async(serve(settings)))


#: Allocations between the cycle collector's young-generation passes (CPython's default: 700).
GC_YOUNG_THRESHOLD = 50_000


def tune_garbage_collector() -> None:
    """Collect cycles less often. A sync of 10,000 service ports allocates hundreds of
    thousands of small objects among as many live ones; with the default thresholds the
    collector rescans the live ones over and over, which cost 40% of a 10,000-port first
    sync (0.75 s against 0.48 s for the nftables mode's plans). The relays free their
    objects without cycles, so little waits for the collector; what does waits for 50,000
    allocations instead of 700. Only the `run` process does this: embedding leaves the host's
    collector as it is."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def raise_open_files_limit() -> None:
    """Every service port holds a listening socket and every connection two: lift the soft
    limit on open files to the hard one, as kube-proxy does (a node with 10,000 service
    ports needs more than the usual 1,024)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def merge_config_file(ctx: click.Context, options: dict[str, Any]) -> dict[str, Any]:
    """Defaults < the --config file < flags given on the command line."""
    path = options["config_file"]
    if path is None:
        return options
    from_file = config.load(path.read_text(), source=str(path))
    merged = dict(options)
    for option, value in from_file.items():
        if ctx.get_parameter_source(option) in (
            click.core.ParameterSource.DEFAULT,
            click.core.ParameterSource.DEFAULT_MAP,
        ):
            merged[option] = value
    return merged


def needs_root(what: str) -> None:
    """`rules` and `cleanup` read and write iptables: without root they would see nothing
    and say so as if nothing were there."""
    if os.geteuid() != 0:
        raise click.ClickException(f"{what} needs root (it reads the iptables rules)")


def do_cleanup() -> int:
    from userproxy import main as composition
    from userproxy.iptables.interface import RulesError

    needs_root("userproxy cleanup")
    try:
        removed = composition.remove_rules()
    except RulesError as err:
        log.error("Cleanup failed.", reason=str(err))
        return 1
    message = "Removed userproxy's iptables rules." if removed else "Nothing to clean up."
    log.info(message, removed=removed)
    return 0


@main.command("cleanup")
@common_logging
def cleanup_command(verbosity: int, log_format: Any) -> None:
    """Remove every userproxy chain and jump rule, of both modes (legacy and nft); safe to
    repeat. iptables-mode chains are removed only if userproxy wrote them."""
    logs.configure(verbosity=verbosity, fmt=log_format)
    sys.exit(do_cleanup())


@main.command("_worker", hidden=True)
@click.option("--channel-fd", type=int, required=True)
def worker(channel_fd: int) -> None:
    """A data-plane worker of `userproxy run --workers N` (started by the leader, which sends
    it the settings over the channel)."""
    raise_open_files_limit()
    from userproxy.userspace.workers import run_worker

    sys.exit(run_async(run_worker(channel_fd)))


@main.command("ls")
@click.option(
    "--address",
    default="127.0.0.1:10249",
    show_default=True,
    help="The running proxy's --metrics-bind-address.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON the proxy serves.")
@click.option(
    "--watch",
    type=float,
    is_flag=False,
    flag_value=1.0,
    default=None,
    metavar="SECONDS",
    help="Refresh every SECONDS (1 if not given) with rates: new connections and bytes per "
    "second per endpoint (like watch ipvsadm -Ln --rate). Ctrl-C ends it.",
)
def ls(address: str, as_json: bool, watch: float | None) -> None:
    """Show a running proxy's service ports and endpoints with their connections
    (in the spirit of ipvsadm -Ln)."""
    import json

    from userproxy.serving.status import render

    url = _status_url(address)
    if watch is not None:
        _watch(url, max(watch, 0.1))
        return
    status = _read_status(url)
    click.echo(json.dumps(status, indent=2) if as_json else render(status), nl=not as_json)
    if as_json:
        click.echo()


def _status_url(address: str) -> str:
    from userproxy.settings import split_address

    try:
        host, port = split_address(address)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--address") from None
    host = "127.0.0.1" if host == "0.0.0.0" else f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/status"


def _read_status(url: str) -> Any:
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise click.ClickException(
            f"cannot read {url} ({err}); is userproxy running with --metrics-bind-address?"
        ) from None


def _watch(url: str, every: float) -> None:
    """The live view: the table with per-second rates, redrawn in place on a terminal
    (appended, without control codes, when piped)."""
    import time

    from userproxy.serving.status import rates, render

    before, then = _read_status(url), time.monotonic()
    try:
        while True:
            time.sleep(every)
            now_status, now = _read_status(url), time.monotonic()
            view = render(now_status, rates(before, now_status, now - then))
            click.clear()  # only on a terminal
            stamp = time.strftime("%H:%M:%S")
            click.echo(f"Every {every:g}s: {url}   {stamp}\n\n{view}")
            before, then = now_status, now
    except KeyboardInterrupt:
        return


@main.command()
def rules() -> None:
    """Print the rules userproxy owns (any mode): iptables-save form, then nft tables."""
    from userproxy import main as composition

    needs_root("userproxy rules")
    click.echo(composition.owned_rules_text(), nl=False)


@main.command()
@click.option("--connections", default=9, show_default=True, help="Connections per round.")
def demo(connections: int) -> None:
    """Balance real connections across three local backends, from a manifest, no cluster."""
    logs.configure(fmt="console", quiet=True)  # the demo narrates; only problems are logged
    from userproxy.demo import run_demo

    async def go() -> int:
        await run_demo(connections=connections, say=click.echo)
        return 0

    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(run_async(go()))
