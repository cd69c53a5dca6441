"""`Nftables` on nftables' own library (libnftables, in-process through ctypes) or, where it
is missing, the `nft` binary: the same commands either way, transactions as `nft -f` text,
reading as `nft --terse --json`.

The library saves a process per call and keeps its context between calls: one change among
10,000 services costs ~55 ms of nft's work instead of ~115 ms, most of it nft reading the
table's chains back before it applies anything (the kernel's check of the jump graph is the
rest). Every call is made from the rule writer's one thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import shutil
import subprocess
import threading
from typing import Any, Protocol

from userproxy.nftables.interface import NftError
from userproxy.nftables.transaction import NftFamily, Table, Transaction

#: No nft call may hold up a sync (or the exit) for longer than this.
NFT_TIMEOUT = 30.0


def nft_available() -> bool:
    return shutil.which("nft") is not None or _library() is not None


class Outcome(Protocol):
    returncode: int
    stdout: str
    stderr: str


class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


# libnftables' output flags (libnftables.h).
_OUTPUT_JSON = 1 << 4
_OUTPUT_TERSE = 1 << 11
_lib_lock = threading.Lock()
_lib: ctypes.CDLL | bool | None = False  # False: not looked for yet


def _library() -> ctypes.CDLL | None:
    """libnftables, or None where it cannot be loaded."""
    global _lib
    with _lib_lock:
        if _lib is False:
            _lib = _load()
        return _lib if isinstance(_lib, ctypes.CDLL) else None


def _load() -> ctypes.CDLL | None:
    path = ctypes.util.find_library("nftables") or "libnftables.so.1"
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
        getattr(lib, name).restype = ctypes.c_char_p
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return lib


class _Context:
    """One libnftables context (its cache lives between calls)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_buffer_output(self.ctx)
        lib.nft_ctx_buffer_error(self.ctx)

    def run(self, command: str, *, listing: bool) -> Outcome:
        lib = self.lib
        lib.nft_ctx_output_set_flags(self.ctx, _OUTPUT_JSON | _OUTPUT_TERSE if listing else 0)
        rc = lib.nft_run_cmd_from_buffer(self.ctx, command.encode())
        out = lib.nft_ctx_get_output_buffer(self.ctx) or b""
        err = lib.nft_ctx_get_error_buffer(self.ctx) or b""
        return _Result(rc, out.decode(errors="replace"), err.decode(errors="replace"))


class ExecNftables:
    def __init__(self, family: NftFamily, table: str, *, use_library: bool = True) -> None:
        self.family = family
        self.table = table
        lib = _library() if use_library else None
        self._context = _Context(lib) if lib is not None else None

    @property
    def name(self) -> str:
        return f"nft {self.family.value} {self.table}"

    def _binary(self, *args: str, stdin: str | None = None) -> Outcome:
        if shutil.which("nft") is None:
            raise NftError("nft is not installed (install the nftables package)")
        try:
            return subprocess.run(
                ["nft", *args],
                input=stdin,
                capture_output=True,
                text=True,
                check=False,
                timeout=NFT_TIMEOUT,
            )
        except subprocess.TimeoutExpired as err:
            raise NftError(f"nft {' '.join(args)} did not finish in {NFT_TIMEOUT:.0f} s") from err

    def _apply(self, text: str) -> Outcome:
        if self._context is not None:
            return self._context.run(text, listing=False)
        return self._binary("-f", "-", stdin=text)

    def _read(self, command: str) -> Outcome:
        """A listing, terse (no set elements) and as JSON. Without terse, listing sets or
        tables reads every element of every set (0.3 s for a 30,000-element table)."""
        if self._context is not None:
            return self._context.run(command, listing=True)
        return self._binary("--terse", "--json", *command.split())

    def run(self, tx: Transaction) -> None:
        if not tx:
            return
        result = self._apply(tx.text())
        if result.returncode != 0:
            raise NftError(f"nft refused the transaction: {explain(result.stderr)}")

    def _list(self, what: str) -> list[dict[str, Any]]:
        result = self._read(f"list {what} {self.family.value}")
        if result.returncode != 0:
            raise NftError(f"nft cannot list {what}: {explain(result.stderr)}")
        try:
            items = json.loads(result.stdout or "{}").get("nftables", [])
        except json.JSONDecodeError as err:
            raise NftError(f"nft --json list {what} gave no JSON ({err})") from err
        return [i for i in items if isinstance(i, dict)]

    def _names(self, what: str, kinds: tuple[str, ...]) -> list[str]:
        out = []
        for item in self._list(what):
            for kind in kinds:
                obj = item.get(kind)
                if isinstance(obj, dict) and obj.get("table") == self.table:
                    out.append(str(obj["name"]))
        return out

    def exists(self) -> bool:
        """Whether the table is there, read from the chains (our tables always have their
        base chains; `list tables` would read every set element first)."""
        return bool(self.chains())

    def chains(self) -> list[str]:
        return self._names("chains", ("chain",))

    def sets(self) -> list[str]:
        return self._names("sets", ("set",)) + self._names("maps", ("map",))

    def listing(self) -> str:
        if not self.exists():
            return ""
        command = f"list table {self.family.value} {self.table}"
        if self._context is not None:
            result = self._context.run(command, listing=False)
        else:
            result = self._binary(*command.split())
        if result.returncode != 0:
            raise NftError(f"nft cannot list table {self.table}: {explain(result.stderr)}")
        return result.stdout

    def delete_table(self) -> bool:
        if not self.exists():
            return False
        tx = Transaction(self.family, self.table)
        tx.delete(Table())
        self.run(tx)
        return True


def explain(stderr: str) -> str:
    """nft's first error, with the command it points at (nft prints it on the next line)."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    if not lines:
        return "no error message"
    first = lines[0]
    if len(lines) > 1 and not lines[1].lstrip().startswith("^"):
        return f"{first} (in: {lines[1].strip()[:200]})"
    return first
