"""`FakeNftables`: one nftables table in memory, changed by the same transactions the real
`nft -f` applies, with the kernel's refusals (so a unit test fails where nft would):

- a transaction lands whole or not at all;
- adding to, flushing or deleting something in a table that does not exist fails;
- a chain, set or map is added idempotently, but re-adding it with another type, hook or
  priority fails; `add element` with a key already mapped to another value fails;
- deleting an element, chain or set that is not there fails; deleting a chain that a rule
  or map element jumps to fails (EBUSY), its own rules go with it; deleting a set a rule
  names fails;
- a rule naming a chain (jump/goto) or a set (@name) that does not exist fails.

Every transaction is recorded, as text, in `transactions` (refused ones too).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from userproxy.nftables.interface import NftError
from userproxy.nftables.transaction import (
    Chain,
    Element,
    NftFamily,
    Operation,
    Rule,
    Set,
    Table,
    Transaction,
)

_CHAIN_REF = re.compile(r"\b(?:jump|goto)\s+([A-Za-z_.][\w./-]*)")
_SET_REF = re.compile(r"@([A-Za-z_.][\w./-]*)")


@dataclass
class FakeTable:
    comment: str | None = None
    chains: dict[str, Chain] = field(default_factory=dict)
    rules: dict[str, list[Rule]] = field(default_factory=dict)
    sets: dict[str, Set] = field(default_factory=dict)
    elements: dict[str, dict[str, str]] = field(default_factory=dict)


class FakeNftables:
    def __init__(self, family: NftFamily = NftFamily.IP, table: str = "userproxy") -> None:
        self.family = family
        self.table = table
        self.state: FakeTable | None = None
        self.transactions: list[str] = []
        #: The next run fails with this message (fault injection), once.
        self.fail_next: str | None = None

    @property
    def name(self) -> str:
        return f"fake nft {self.family.value} {self.table}"

    # ------------------------------------------------------------------ reading
    def exists(self) -> bool:
        return self.state is not None

    def chains(self) -> list[str]:
        return list(self.state.chains) if self.state else []

    def sets(self) -> list[str]:
        return list(self.state.sets) if self.state else []

    def rules(self, chain: str) -> list[str]:
        """The rules of a chain, as written (comments left out)."""
        assert self.state is not None, "no table"
        return [r.rule for r in self.state.rules[chain]]

    def elements(self, container: str) -> dict[str, str]:
        """key -> value ("" for sets), keys and values as `a . b` text."""
        assert self.state is not None, "no table"
        return dict(self.state.elements[container])

    def listing(self) -> str:
        if self.state is None:
            return ""
        out = [f"table {self.family.value} {self.table} {{"]
        for name, s in self.state.sets.items():
            items = ", ".join(
                f"{k} : {v}" if s.value_type else k for k, v in self.state.elements[name].items()
            )
            out.append(f"\t{s.kind} {name} {{ type {s.key_type} elements = {{ {items} }} }}")
        for name in self.state.chains:
            out.append(f"\tchain {name} {{")
            out += [f"\t\t{r.rule}" for r in self.state.rules[name]]
            out.append("\t}")
        out.append("}")
        return "\n".join(out) + "\n"

    def delete_table(self) -> bool:
        if self.state is None:
            return False
        self.state = None
        return True

    # ------------------------------------------------------------------ writing
    def run(self, tx: Transaction) -> None:
        if not tx:
            return
        self.transactions.append(tx.text())
        if self.fail_next is not None:
            message, self.fail_next = self.fail_next, None
            raise NftError(message)
        state = copy.deepcopy(self.state)
        for op in tx.operations:
            state = _apply(state, op)
        self.state = state


def _apply(state: FakeTable | None, op: Operation) -> FakeTable | None:
    obj, verb = op.obj, op.verb
    if isinstance(obj, Table):
        if verb == "add":
            return state or FakeTable(comment=obj.comment)
        if state is None:
            raise NftError("Could not process rule: No such file or directory (table)")
        if verb == "delete":
            return None
        raise NftError("tables are not flushed here")
    if state is None:
        raise NftError(f"Could not process rule: No such file or directory ({obj!r})")
    if isinstance(obj, Chain):
        _chain(state, verb, obj)
    elif isinstance(obj, Set):
        _set(state, verb, obj)
    elif isinstance(obj, Element):
        _element(state, verb, obj)
    else:
        _rule(state, obj)
    return state


def _chain(state: FakeTable, verb: str, chain: Chain) -> None:
    name = chain.name
    if verb == "add":
        known = state.chains.get(name)
        if known is None:
            state.chains[name] = chain
            state.rules[name] = []
        elif known.base != chain.base and chain.base is not None:
            raise NftError(f"Could not process rule: Device or resource busy (chain {name})")
        return
    if name not in state.chains:
        raise NftError(f"Could not process rule: No such file or directory (chain {name})")
    if verb == "flush":
        state.rules[name] = []
        return
    if _chain_referenced(state, name):
        raise NftError(f"Could not process rule: Device or resource busy (chain {name})")
    del state.chains[name], state.rules[name]


def _chain_referenced(state: FakeTable, name: str) -> bool:
    for rules in state.rules.values():
        for rule in rules:
            if name in _CHAIN_REF.findall(rule.rule):
                return True
    return any(
        name in _CHAIN_REF.findall(value)
        for elements in state.elements.values()
        for value in elements.values()
    )


def _set(state: FakeTable, verb: str, s: Set) -> None:
    name = s.name
    if verb == "add":
        known = state.sets.get(name)
        if known is None:
            state.sets[name] = s
            state.elements[name] = {}
        elif (known.key_type, known.value_type) != (s.key_type, s.value_type):
            raise NftError(f"Could not process rule: File exists ({s.kind} {name})")
        return
    if name not in state.sets:
        raise NftError(f"Could not process rule: No such file or directory ({s.kind} {name})")
    if verb == "flush":
        state.elements[name] = {}
        return
    if any(name in _SET_REF.findall(r.rule) for rules in state.rules.values() for r in rules):
        raise NftError(f"Could not process rule: Device or resource busy ({s.kind} {name})")
    del state.sets[name], state.elements[name]


def _element(state: FakeTable, verb: str, e: Element) -> None:
    if e.container not in state.sets:
        raise NftError(f"Could not process rule: No such file or directory ({e.container})")
    elements = state.elements[e.container]
    key = e.key_text
    if verb == "delete":
        if key not in elements:
            raise NftError(f"Could not process rule: No such file or directory (element {key})")
        del elements[key]
        return
    for target in _CHAIN_REF.findall(e.value_text):
        if target not in state.chains:
            raise NftError(f"Could not process rule: No such file or directory ({target})")
    if key in elements and elements[key] != e.value_text:
        raise NftError(f"Could not process rule: File exists (element {key})")
    elements[key] = e.value_text


def _rule(state: FakeTable, rule: Rule) -> None:
    if rule.chain not in state.chains:
        raise NftError(f"Could not process rule: No such file or directory ({rule.chain})")
    for target in _CHAIN_REF.findall(rule.rule):
        if target not in state.chains:
            raise NftError(f"Could not process rule: No such file or directory ({target})")
    for name in _SET_REF.findall(rule.rule):
        if name not in state.sets:
            raise NftError(f"Could not process rule: No such file or directory (@{name})")
    state.rules[rule.chain].append(rule)
