"""Finding the error that matters inside Trio's exception groups: written once.

A nursery wraps whatever its tasks raised in a (Base)ExceptionGroup, nested once per nursery
level, with the cancellations of the sibling tasks beside the one real failure. The client kit
(what to surface, whether to reconnect), the relay (where a connection failed, without logging
its values) and `cozy bench` each need the leaves of such a tree; they ask here. Pure: no Trio
import (the caller names the exception types to skip, e.g. `trio.Cancelled`).
"""

from __future__ import annotations

__all__ = ["first_error", "innermost", "leaves"]


def leaves(exc: BaseException) -> list[BaseException]:
    """Every exception in the tree that is not itself a group, depth first, in order raised;
    `[exc]` for a plain exception."""
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    out: list[BaseException] = []
    for inner in exc.exceptions:
        out.extend(leaves(inner))
    return out


def innermost(exc: BaseException) -> BaseException:
    """The exception inside any number of one-member groups; a group with several members (or
    a plain exception) is returned as it is."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def first_error(
    exc: BaseException,
    *,
    prefer: tuple[type[BaseException], ...] = (),
    skip: tuple[type[BaseException], ...] = (),
) -> BaseException | None:
    """The leaf that ended a group of tasks: the first of a `prefer` type if any, else the first
    `Exception`, else the first of any kind, never one of a `skip` type (cancellations that
    only followed the failure); None when every leaf is skipped."""
    found = [e for e in leaves(exc) if not isinstance(e, skip)]
    for wanted in (*prefer, Exception, BaseException):
        for leaf in found:
            if isinstance(leaf, wanted):
                return leaf
    return None
