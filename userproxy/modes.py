"""The proxy modes: the one place a mode is registered.

Each mode names, as "module:function" strings imported only when needed (so a mode's
dependencies load only when it runs):
- `provider`: builds its `Provider` from the settings, given `take_over_rules`, to call when
  the mode is about to write rules: it takes the instance lock (one instance per node) and
  removes every other mode's rules (a mode switch leaves nothing behind);
- `rules`: a module with `cleanup(iptables) -> int` and `owned_rules_text(iptables) -> str`,
  for `userproxy cleanup`, `userproxy rules` and mode switches (None: no iptables rules);
- `tables`: the nftables tables the mode owns (in both the `ip` and `ip6` families), deleted
  by `userproxy cleanup` and by a switch to another mode, printed by `userproxy rules`.

A new mode is a package implementing `userproxy.provider.Provider` plus one entry here.
The registry is data: `userproxy.main` builds providers and removes rules through it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Mode:
    provider: str
    rules: str | None
    tables: tuple[str, ...] = ()


MODES: dict[str, Mode] = {
    "userspace": Mode(
        provider="userproxy.userspace.setup:make_provider",
        rules="userproxy.userspace.portals.backends",
        tables=("userproxy-portals",),
    ),
    "iptables": Mode(
        provider="userproxy.iptables_mode.setup:make_provider",
        rules="userproxy.iptables_mode.provider",
    ),
    "nftables": Mode(
        provider="userproxy.nftables_mode.setup:make_provider",
        rules=None,
        tables=("userproxy",),
    ),
}


def load(reference: str) -> Any:
    """The object a "module:name" (or plain "module") reference names, imported now."""
    module, _, name = reference.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, name) if name else loaded
