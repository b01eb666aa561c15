"""Structured logs (structlog). Events carry ids and codes, never secrets or ciphertext.

Only the server side logs through structlog (the relay, the witness, the dev stack); the client
kit never imports it (an import-linter contract), so the people's commands do not configure it
and do not pay for importing it (~0.3 s with its console renderer's optional `rich`).
"""

from __future__ import annotations

import logging
import sys


def configure(*, json: bool = False, level: int = logging.INFO) -> None:
    import structlog

    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
