"""Small trio helpers shared by the drivers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def unwrap_group() -> Iterator[None]:
    """Re-raise the lone exception of a nursery's ExceptionGroup as itself.

    trio wraps everything leaving a nursery in an ExceptionGroup; our drivers
    raise typed outcomes (JobFailure, JobGone) through nurseries and callers
    match on the type. Groups of several exceptions propagate unchanged.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        flat = _flatten(group)
        if len(flat) == 1:
            raise flat[0] from None
        raise


def _flatten(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_flatten(exc))
        else:
            out.append(exc)
    return out
