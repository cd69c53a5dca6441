"""The proxy modes: the one place a mode is registered.

Each mode names, as "module:function" strings imported only when needed (so a mode's
dependencies load only when it runs):
- `provider`: builds its `Provider` from the settings, given a callable that removes every
  other mode's rules (called when the mode is about to write its own: a mode switch leaves
  nothing behind);
- `rules`: a module with `cleanup(iptables) -> int` and `owned_rules_text(iptables) -> str`,
  for `userproxy cleanup`, `userproxy rules` and mode switches.

A new mode is a package implementing `userproxy.provider.Provider` plus one entry here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from userproxy.provider import Provider
    from userproxy.settings import Settings


@dataclass(frozen=True)
class Mode:
    provider: str
    rules: str


MODES: dict[str, Mode] = {
    "userspace": Mode(
        provider="userproxy.userspace.setup:make_provider",
        rules="userproxy.userspace.portals.backends",
    ),
    "iptables": Mode(
        provider="userproxy.iptables_mode.setup:make_provider",
        rules="userproxy.iptables_mode.provider",
    ),
}


def make_provider(settings: Settings) -> Provider:
    """The provider of `settings.mode`. Raises `provider.StartupError` when the host cannot
    run it as configured."""
    module, _, name = MODES[settings.mode].provider.partition(":")
    build: Callable[..., Provider] = getattr(importlib.import_module(module), name)
    return build(settings, remove_other_modes=lambda: remove_rules(keep=settings.mode))


def _rules_modules(keep: str | None = None) -> list[Any]:
    return [importlib.import_module(m.rules) for name, m in MODES.items() if name != keep]


def remove_rules(*, keep: str | None = None) -> int:
    """Remove every mode's rules (but `keep`'s) from both iptables variants. Idempotent."""
    from userproxy.iptables.detect import host_iptables

    hosts = host_iptables().values()
    return sum(module.cleanup(iptables) for module in _rules_modules(keep) for iptables in hosts)


def owned_rules_text() -> str:
    """Every rule any mode owns, in iptables-save form, per variant that has any."""
    from userproxy.iptables.detect import host_iptables

    hosts = host_iptables().values()
    return "".join(
        module.owned_rules_text(iptables) for module in _rules_modules() for iptables in hosts
    )
