"""What every dock shares: how an error from the core reaches the user."""

from __future__ import annotations

import logging

from napari.utils.notifications import show_error

from ..errors import PathosegError

__all__ = ["report_error"]

logger = logging.getLogger(__name__)


def report_error(exc: BaseException, *, action: str) -> str:
    """Show ``exc`` as a napari notification and return the text shown.

    A :class:`PathosegError` is bad input the user can fix: its message is shown as is.
    Anything else is a bug: it is logged with its traceback and shown as
    ``"<action> failed: <type>: <message>"``.
    """
    if isinstance(exc, PathosegError):
        text = str(exc)
    else:
        logger.error("%s failed", action, exc_info=exc)
        text = f"{action} failed: {type(exc).__name__}: {exc}"
    show_error(text)
    return text
