"""The composition root of `userproxy run`: settings in, a serving proxy out, until cancelled.

serve(settings)  picks the source (manifest files or the API server), builds the provider
                 of the mode (`userproxy.modes`), the health and metrics servers, and runs
                 the long-lived tasks (the source's watch, the sync loop) under
                 `tasks.first_exit`: if one of them ends, the process stops cleanly with a
                 non-zero exit instead of running half-alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from userproxy import modes, tasks
from userproxy.app import UserProxy
from userproxy.handover.adoption import Adoption
from userproxy.handover.giver import HandoverServer
from userproxy.handover.journal import PortJournal
from userproxy.handover.protocol import LOCK
from userproxy.handover.taker import Inheritance, Refused, take_over
from userproxy.instance import InstanceBusy, InstanceLock
from userproxy.iptables.detect import host_iptables
from userproxy.iptables.interface import Iptables, RulesError
from userproxy.localaddrs import local_addresses
from userproxy.model import Family
from userproxy.nftables.exec import ExecNftables, nft_available
from userproxy.nftables.interface import NftError
from userproxy.nftables.transaction import NftFamily
from userproxy.provider import Provider, StartupError
from userproxy.serving.servers import ServerError, Servers
from userproxy.serving.servicehealth import ServiceHealthServers
from userproxy.settings import Settings, to_options
from userproxy.sources.manifests import ManifestError, ManifestSource

log = structlog.get_logger("userproxy")

#: Exit codes: 1 cannot start or a long-lived task failed, 2 bad input (manifests, kubeconfig).
EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


@dataclass
class Node:
    """A proxy with everything the process around it owns: its servers, the instance lock,
    how it began (inherited sockets), and the hand-over offer to a successor."""

    settings: Settings
    proxy: UserProxy
    servers: Servers
    lock: InstanceLock | None
    start: Start
    terminate: asyncio.Event = field(default_factory=asyncio.Event)
    giver: HandoverServer | None = None
    health_checks: ServiceHealthServers | None = None

    @classmethod
    def bare(cls, proxy: UserProxy) -> Node:
        """A node around an existing proxy, without servers, lock or hand-over (tests)."""
        servers = Servers(proxy, healthz_address="", metrics_address="")
        return cls(proxy.settings, proxy, servers, None, Start(Adoption()))

    async def serving(self) -> None:
        """After the first sync: the Services' health checks open, the predecessor may stop
        accepting, successors may ask."""
        await self._serve_health_checks()
        if self.lock is not None:
            journal = PortJournal(self.lock.journal_path)
            provider = self.proxy.provider
            self.proxy.after_sync.append(lambda: journal.save(provider.listener_ports()))
            journal.save(provider.listener_ports())
        if self.start.inheritance is not None:
            await self.start.inheritance.confirm()
            log.info("Took over from the previous process; it stops accepting and drains.",
                     previous=self.start.inheritance.peer_pid)  # fmt: skip
        if self.lock is not None:
            self.giver = HandoverServer(self.lock.handover_path, _Giver(self))
            await self.giver.start()

    async def outcome(self) -> str:
        """Wait for how this process's serving ends: `handed-over`, `stepped-aside` (a
        successor that speaks no common version), or `no-successor` (SIGTERM, then nobody
        came within --successor-wait). Plain cancellation (SIGINT, SIGTERM without a
        successor wait) stops the process as before."""
        offers = self._offers()
        first = await _first_set({**offers, "terminated": self.terminate})
        if first != "terminated":
            assert first is not None  # no timeout
            return first
        wait = self.settings.handover.successor_wait
        log.info("Asked to stop: serving on while a successor may take over.", seconds=wait)
        return await _first_set(offers, timeout=wait) or "no-successor"

    async def _serve_health_checks(self) -> None:
        checks = self.health_checks = ServiceHealthServers(
            proxy_healthy=lambda: self.servers.health().healthy,
            addresses=lambda: health_check_addresses(self.settings),
            adoption=self.start.adoption,
        )

        def after_sync() -> None:
            tasks.background(checks.update(self.proxy.status()), name="service-health")

        self.proxy.after_sync.append(after_sync)
        await checks.update(self.proxy.status())
        self.start.adoption.close_rest()  # inherited sockets nothing took: their owners are gone

    def _offers(self) -> dict[str, asyncio.Event]:
        if self.giver is None:
            return {}
        return {"handed-over": self.giver.handed_over, "stepped-aside": self.giver.stepped_aside}

    async def finish(self, outcome: str) -> int:
        """End serving after `outcome`: the rules stay for whoever serves next."""
        self.proxy.keep_rules = True
        if outcome == "handed-over":
            assert self.giver is not None
            timeout = self.settings.handover.drain_timeout
            log.info("Handed over; draining the established connections.",
                     successor=self.giver.successor_pid, timeout=timeout)  # fmt: skip
            left = await self.proxy.provider.drain(timeout)
            log.info("Drained; exiting.", cut=left)
            if self.settings.handover.linger_after_handover:
                log.info("Waiting for SIGTERM (--linger-after-handover).")
                await self.terminate.wait()
        else:
            log.info("Stopping; the rules stay for the next process.", reason=outcome)
        return 0

    async def close(self) -> None:
        if self.giver is not None:
            await self.giver.close()
        if self.health_checks is not None:
            await self.health_checks.close()
        self.start.abandon()


class _Giver:
    """What the hand-over server asks of this node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.mode = node.settings.mode

    def handover_fds(self) -> list[tuple[str, int]]:
        node = self.node
        fds = node.proxy.provider.handover_fds() + node.servers.handover_fds()
        if node.health_checks is not None:
            fds += node.health_checks.handover_fds()
        if node.lock is not None and node.lock.fd is not None:
            fds.append((LOCK, node.lock.fd))
        return fds

    async def pause(self) -> None:
        await self.node.proxy.runner.pause()

    def resume(self) -> None:
        self.node.proxy.runner.resume()

    async def release(self) -> None:
        self.node.proxy.provider.stop_accepting()
        await self.node.servers.stop()
        if self.node.health_checks is not None:
            await self.node.health_checks.close()


async def _first_set(events: dict[str, asyncio.Event], timeout: float | None = None) -> str | None:
    """The name of the first event set (None when `timeout` passes first)."""
    if not events:
        if timeout is None:
            await asyncio.Event().wait()
        await asyncio.sleep(timeout or 0)
        return None
    waiters = {asyncio.ensure_future(event.wait()): name for name, event in events.items()}
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return waiters[next(iter(done))] if done else None


@dataclass
class Start:
    """How this process begins: cold (proxy ports from the journal, if a predecessor died),
    or with the sockets a running predecessor handed over."""

    adoption: Adoption
    inheritance: Inheritance | None = None

    def abandon(self) -> None:
        if self.inheritance is not None:
            self.inheritance.abandon()
        self.adoption.close_rest()


#: Seconds a successor waits for a predecessor that refused hand-over to exit.
STEP_ASIDE_TIMEOUT = 30.0


async def begin(settings: Settings, lock: InstanceLock | None) -> Start:
    """Take the instance lock, or take over from the process holding it."""
    if lock is None:
        return Start(Adoption())
    journal = PortJournal(lock.journal_path)
    try:
        lock.acquire()
        return Start(Adoption(ports=journal.load()))
    except InstanceBusy as busy:
        if not settings.handover.take_over:
            raise
        got = await take_over(lock.handover_path, mode=settings.mode)
        if got is None:
            raise busy from None
        if isinstance(got, Refused):
            log.warning("The running userproxy cannot hand over; waiting for it to exit.",
                        reason=got.reason)  # fmt: skip
            if not await asyncio.to_thread(lock.wait, STEP_ASIDE_TIMEOUT):
                raise busy from None
            return Start(Adoption(ports=journal.load()))
    lock_fd = got.take_lock()
    if lock_fd is None:
        got.abandon()
        raise StartupError("the running userproxy handed over no instance lock")
    lock.adopt(lock_fd)
    log.info("Taking over from the running userproxy.", previous=got.peer_pid,
             descriptors=len(got.fds) + 1)  # fmt: skip
    return Start(got.adoption(ports=journal.load()), got)


def health_check_addresses(settings: Settings) -> list[str]:
    """Where Service health checks listen: every address, or the node's addresses within
    `--nodeport-addresses` (as NodePorts)."""
    if not settings.nodeport_addresses:
        return ["0.0.0.0", "::"]
    networks = [ipaddress.ip_network(cidr) for cidr in settings.nodeport_addresses]
    return sorted(
        ip for ip in local_addresses() if any(ipaddress.ip_address(ip) in n for n in networks)
    )


def writes_rules(settings: Settings) -> bool:
    """Whether this process will manage the node's rules (and so needs the instance lock)."""
    if not settings.instance_lock:
        return False
    if settings.mode != "userspace":
        return True
    return settings.userspace.portals != "off" and os.geteuid() == 0


@contextlib.asynccontextmanager
async def prepared(settings: Settings) -> AsyncIterator[Node]:
    """A proxy with its provider and its health and metrics servers, not yet started."""
    lock = InstanceLock() if writes_rules(settings) else None
    start = await begin(settings, lock)
    try:
        provider = make_provider(settings, lock, start.adoption)
    except BaseException:
        start.abandon()
        if lock is not None:
            lock.release()
        raise
    proxy = UserProxy(settings, proxy_name=settings.sources.service_proxy_name, provider=provider)
    servers = Servers(
        proxy,
        healthz_address=settings.healthz_bind_address,
        metrics_address=settings.metrics_bind_address,
        configz=configz_document(settings),
        adoption=start.adoption,
    )
    node = Node(settings, proxy, servers, lock, start)
    try:
        try:
            await servers.start()
        except ServerError as err:
            if settings.bind_address_hard_fail:
                raise StartupError(str(err)) from err
            log.error("Continuing without the server that cannot bind.", reason=str(err))
        _graceful_sigterm(node)
        yield node
    finally:
        await node.close()
        await servers.stop()
        await proxy.close_unstarted()
        if lock is not None:
            if not proxy.keep_rules and lock.held:
                # The rules went with us: no later process needs our ports.
                with contextlib.suppress(OSError):
                    lock.journal_path.unlink()
            lock.release()


def _graceful_sigterm(node: Node) -> None:
    """With --successor-wait, the first SIGTERM asks for a hand-over-friendly stop (see
    `Node.outcome`); a second one, or SIGINT, stops at once."""
    if node.settings.handover.successor_wait <= 0 and not (
        node.settings.handover.linger_after_handover
    ):
        return
    task = asyncio.current_task()
    assert task is not None

    def on_sigterm() -> None:
        if node.terminate.is_set():
            task.cancel()
        node.terminate.set()

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)


def configz(settings: Settings) -> dict[str, Any]:
    """The effective configuration, in option form, as /configz serves it."""
    from userproxy import config

    wanted = {option for option, _ in config.USED.values()}
    return {k: v for k, v in to_options(settings).items() if k in wanted}


def configz_document(settings: Settings) -> dict[str, Any]:
    """/configz as kube-proxy serves it: the KubeProxyConfiguration's own field names."""
    from userproxy import config

    return config.document(configz(settings))


def make_provider(
    settings: Settings, lock: InstanceLock | None = None, adoption: Adoption | None = None
) -> Provider:
    """The provider of `settings.mode` (see `userproxy.modes`). Raises StartupError when the
    host cannot run it as configured, or when another instance manages the rules."""

    def take_over_rules() -> None:
        if lock is not None:
            lock.acquire()
        remove_rules(keep=settings.mode)

    build: Callable[..., Provider] = modes.load(modes.MODES[settings.mode].provider)
    return build(settings, take_over_rules=take_over_rules, adoption=adoption)


def _rules_modules() -> list[Any]:
    return [modes.load(mode.rules) for mode in modes.MODES.values() if mode.rules]


def _families() -> list[Family]:
    """IPv4, and IPv6 where the host has it."""
    families = [Family.IPv4]
    if Path("/proc/net/if_inet6").exists():
        families.append(Family.IPv6)
    return families


def _hosts() -> list[Iptables]:
    """Both iptables variants of IPv4, and of IPv6 where the host has it."""
    return [iptables for family in _families() for iptables in host_iptables(family).values()]


def _nft_tables(keep: str | None = None) -> list[ExecNftables]:
    """Every nftables table any mode (but `keep`) owns, in each family the host has."""
    if not nft_available():
        return []
    return [
        ExecNftables(NftFamily.of(family), table)
        for name, mode in modes.MODES.items()
        if name != keep
        for table in mode.tables
        for family in _families()
    ]


def _each(hosts: list[Iptables], action: Callable[[Any, Iptables], Any]) -> list[Any]:
    """`action` on every (rules module, variant); an IPv6 variant the host cannot use (no
    ip6tables binary or table) is skipped, an IPv4 failure is raised."""
    out = []
    for iptables in hosts:
        for module in _rules_modules():
            try:
                out.append(action(module, iptables))
            except (RulesError, OSError):
                if iptables.family is Family.IPv4:
                    raise
    return out


def remove_rules(*, keep: str | None = None) -> int:
    """Remove every mode's rules (but `keep`'s) from both iptables variants and nftables,
    both families. Idempotent."""
    rules = modes.MODES[keep].rules if keep else None
    keep_module = modes.load(rules) if rules else None
    removed: int = sum(_each(_hosts(), lambda m, ipt: 0 if m is keep_module else m.cleanup(ipt)))
    for nft in _nft_tables(keep):
        try:
            removed += nft.delete_table()
        except NftError as err:
            raise RulesError(str(err)) from err
    return removed


def owned_rules_text() -> str:
    """Every rule any mode owns: iptables-save form per variant and family that has any,
    then each nftables table in `nft list` form."""
    texts = _each(_hosts(), lambda m, ipt: m.owned_rules_text(ipt))
    for nft in _nft_tables():
        try:
            listing = nft.listing()
        except NftError:
            continue
        if listing:
            texts.append(f"# {nft.name}\n{listing}")
    return "".join(texts)


async def serve(settings: Settings) -> int:
    """Serve `settings.sources` until cancelled (exit code 0) or something fails."""
    try:
        if settings.sources.manifests:
            return await serve_manifests(settings, Path(settings.sources.manifests))
        return await serve_kubernetes(settings)
    except StartupError as err:
        log.error("Cannot start.", reason=str(err))
        return EXIT_FAILED


async def serve_manifests(settings: Settings, path: Path) -> int:
    """Serve the Services in `path`, reloading when the files change."""
    async with prepared(settings) as node:
        proxy = node.proxy
        source = ManifestSource(path, proxy.router, on_change=proxy.runner.request)
        try:
            source.load()
        except ManifestError as err:
            log.error("Cannot read the manifests.", reason=str(err))
            return EXIT_BAD_INPUT
        return await _run(node, source.watch, manifests=str(path))


async def serve_kubernetes(settings: Settings) -> int:
    """Follow the API server and serve its Services."""
    from kubernetes_asyncio.config import ConfigException

    from userproxy.sources.kube import KubeSource, api_client, node_zone

    connection = settings.client_connection
    try:
        api = await api_client(connection.kubeconfig or None, connection.master or None)
    except (ConfigException, OSError, ValueError) as err:
        log.error(
            "Cannot configure the API client.", kubeconfig=connection.kubeconfig, reason=str(err)
        )
        return EXIT_BAD_INPUT
    try:
        if not settings.node_zone:
            zone = await node_zone(api, settings.node_name)
            settings = dataclasses.replace(settings, node_zone=zone)
        async with prepared(settings) as node:
            proxy = node.proxy
            proxy.router.node_port_range = None  # the API server checked its own range
            source = KubeSource(
                api,
                proxy.router,
                on_change=proxy.runner.request,
                proxy_name=settings.sources.service_proxy_name,
                use_endpoints=settings.sources.use_endpoints,
            )
            # The first sync counts as queued from now: /healthz turns 503 if the API server
            # cannot be listed within twice the sync period.
            proxy.runner.request()
            log.info("Listing Services and endpoints.", server=source.server)
            await source.initial_list()
            return await _run(node, source.watch, server=source.server)
    finally:
        await api.close()


async def _run(node: Node, watch: Callable[[], Awaitable[None]], **source: str) -> int:
    """Start the proxy and run the source's watch (restarted with backoff if it fails; health
    turns unhealthy while it keeps failing) and the sync loop (stopping with exit code 1 if
    it ever ends: it catches every failure of a sync itself), until a successor takes over."""
    proxy = node.proxy
    async with proxy:
        await node.serving()
        _log_running(proxy, **source)
        assert proxy.sync_task is not None
        watching = tasks.restarting(
            watch,
            name="source",
            on_failure=proxy.runner.stall,
            on_recovery=proxy.runner.unstall,
        )
        ended = await tasks.first_exit(
            {
                "source": watching,
                "sync": proxy.sync_task,
                "lifecycle": tasks.background(node.outcome(), name="lifecycle"),
            }
        )
        if ended.task == "lifecycle" and not ended.failed:
            return await node.finish(ended.result)
    log.error(
        "A long-lived task ended; stopping.",
        task=ended.task,
        failed=ended.failed,
    )
    return EXIT_FAILED


def _log_running(proxy: UserProxy, **source: str) -> None:
    first_sync = proxy.runner.last_duration
    log.info(
        "userproxy is running.",
        **source,
        service_ports=len(proxy.service_ports()),
        first_sync_seconds=None if first_sync is None else round(first_sync, 3),
    )
