"""structlog configuration for the CLI. Libraries never call this; embedders configure their own.

Console output when stderr is a terminal, one JSON object per line otherwise. Standard-library
loggers (asyncio, aiohttp, kubernetes-asyncio) are routed through the same processors.
`-v` levels follow klog's meaning: 0 warnings and service changes, 1 info, 2+ debug.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["auto", "console", "json"]


def level_for(verbosity: int) -> int:
    """0: what happened to services and the proxy (info); -v: every port and change (debug);
    -vv: also the client libraries' debug."""
    return logging.INFO if verbosity <= 0 else logging.DEBUG


def configure(*, verbosity: int = 0, fmt: LogFormat = "auto", quiet: bool = False) -> None:
    """`quiet`: warnings and errors only (the demo, which narrates what happens itself)."""
    level = logging.WARNING if quiet else level_for(verbosity)
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: structlog.typing.Processor = (
        # Colours only for a terminal: `--log-format console` into a file or a pipe stays plain.
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if console
        else structlog.processors.JSONRenderer()
    )
    # Tracebacks as data, without the frames' local variables: locals can hold anything
    # (tokens, whole objects) and a log must never carry credentials.
    as_dict = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
    tracebacks = [] if console else [structlog.processors.ExceptionRenderer(as_dict)]
    # userproxy's own events skip the logging module: a filtering bound logger writing
    # straight to stderr costs a fraction of the stdlib route (10,000 service ports log
    # 10,000 lines at startup).
    structlog.configure(
        processors=[*shared, *tracebacks, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Standard-library loggers (asyncio, aiohttp, kubernetes-asyncio) go through the same
    # processors and renderer.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *tracebacks,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Client libraries are chatty at INFO; keep them at WARNING unless asked for debug.
    for noisy in ("aiohttp.access", "kubernetes_asyncio"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
