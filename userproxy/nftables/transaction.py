"""nftables objects and transactions, as data. Pure.

A `Transaction` is an ordered list of operations (add, flush, delete) on the objects of one
table; `text()` renders it for `nft -f`, which applies it atomically: every operation lands or
none does. Consecutive element operations on the same set or map are written as one command
(the kernel sees the same batch; `nft` parses 10,000 elements in one line much faster).

The fake in `userproxy.testing.fakes` applies the same operations to a model in memory, so
unit tests check what the rules mean, not how they are spelled.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal, NamedTuple

from userproxy.model import Family

Verb = Literal["add", "flush", "delete"]


class NftFamily(Enum):
    """The nftables address family of a table (`ip` holds IPv4 rules, `ip6` IPv6)."""

    IP = "ip"
    IP6 = "ip6"

    @classmethod
    def of(cls, family: Family) -> NftFamily:
        return cls.IP6 if family is Family.IPv6 else cls.IP


@dataclass(frozen=True, slots=True)
class Table:
    comment: str | None = None


@dataclass(frozen=True, slots=True)
class BaseChain:
    """Where a base chain hooks in: `type nat hook prerouting priority -100`."""

    type: Literal["filter", "nat"]
    hook: Literal["prerouting", "input", "forward", "output", "postrouting"]
    priority: int


@dataclass(frozen=True, slots=True)
class Chain:
    name: str
    base: BaseChain | None = None
    comment: str | None = None


@dataclass(frozen=True, slots=True)
class Set:
    """A set; with `value_type` a map (`type KEY : VALUE`)."""

    name: str
    key_type: str
    value_type: str | None = None
    flags: tuple[str, ...] = ()
    timeout_s: int | None = None
    comment: str | None = None

    @property
    def kind(self) -> str:
        return "set" if self.value_type is None else "map"


@dataclass(frozen=True, slots=True)
class Element:
    """One element of a set (no value) or map: key and value parts are joined with " . "."""

    container: str
    key: tuple[str, ...]
    value: tuple[str, ...] = ()
    is_map: bool = False

    @property
    def key_text(self) -> str:
        return " . ".join(self.key)

    @property
    def value_text(self) -> str:
        return " . ".join(self.value)


@dataclass(frozen=True, slots=True)
class Rule:
    chain: str
    rule: str
    comment: str | None = None


Object = Table | Chain | Set | Element | Rule


class Operation(NamedTuple):
    """One command (a tuple: a 10,000-service transaction makes 70,000 of them)."""

    verb: Verb
    obj: Object


def quote(text: str) -> str:
    """A comment as an nft string (nft strings cannot hold a double quote)."""
    return '"' + text.replace('"', "'")[:128] + '"'


@dataclass
class Transaction:
    family: NftFamily
    table: str
    operations: list[Operation] = field(default_factory=list)

    def add(self, obj: Object) -> None:
        self.operations.append(Operation("add", obj))

    def flush(self, obj: Chain | Set) -> None:
        self.operations.append(Operation("flush", obj))

    def delete(self, obj: Object) -> None:
        self.operations.append(Operation("delete", obj))

    def extend(self, other: Transaction) -> None:
        self.operations.extend(other.operations)

    def __len__(self) -> int:
        return len(self.operations)

    def __bool__(self) -> bool:
        return bool(self.operations)

    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines())

    def lines(self) -> Iterator[str]:
        where = f"{self.family.value} {self.table}"
        ops = self.operations
        i = 0
        while i < len(ops):
            op = ops[i]
            if isinstance(op.obj, Element):
                j = i + 1
                while j < len(ops) and _same_batch(ops[j], op):
                    j += 1
                yield _elements_line(op.verb, where, [o.obj for o in ops[i:j]])  # type: ignore[misc]
                i = j
                continue
            yield _line(op.verb, where, op.obj)
            i += 1


def _same_batch(op: Operation, first: Operation) -> bool:
    return (
        op.verb == first.verb
        and isinstance(op.obj, Element)
        and isinstance(first.obj, Element)
        and op.obj.container == first.obj.container
    )


def _elements_line(verb: Verb, where: str, elements: Sequence[Element]) -> str:
    if verb == "delete":
        items = ", ".join(e.key_text for e in elements)
    else:
        items = ", ".join(
            f"{e.key_text} : {e.value_text}" if e.is_map else e.key_text for e in elements
        )
    return f"{verb} element {where} {elements[0].container} {{ {items} }}"


def _line(verb: Verb, where: str, obj: Object) -> str:
    if isinstance(obj, Table):
        body = f" {{ comment {quote(obj.comment)} ; }}" if obj.comment and verb == "add" else ""
        return f"{verb} table {where}{body}"
    if isinstance(obj, Chain):
        return f"{verb} chain {where} {obj.name}{_chain_body(obj) if verb == 'add' else ''}"
    if isinstance(obj, Set):
        return f"{verb} {obj.kind} {where} {obj.name}{_set_body(obj) if verb == 'add' else ''}"
    if isinstance(obj, Rule):
        if verb != "add":
            raise ValueError("rules are only added; flush their chain to remove them")
        comment = f" comment {quote(obj.comment)}" if obj.comment else ""
        return f"add rule {where} {obj.chain} {obj.rule}{comment}"
    raise TypeError(f"not an nftables object: {obj!r}")


def _chain_body(chain: Chain) -> str:
    parts = []
    if chain.base is not None:
        b = chain.base
        parts.append(f"type {b.type} hook {b.hook} priority {b.priority} ; policy accept ;")
    if chain.comment:
        parts.append(f"comment {quote(chain.comment)} ;")
    return f" {{ {' '.join(parts)} }}" if parts else ""


def _set_body(s: Set) -> str:
    parts = [f"type {s.key_type}{f' : {s.value_type}' if s.value_type else ''} ;"]
    if s.flags:
        parts.append(f"flags {','.join(s.flags)} ;")
    if s.timeout_s is not None:
        parts.append(f"timeout {s.timeout_s}s ;")
    if s.comment:
        parts.append(f"comment {quote(s.comment)} ;")
    return f" {{ {' '.join(parts)} }}"
