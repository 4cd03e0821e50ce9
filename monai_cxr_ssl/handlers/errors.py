"""Bad-input errors raised inside an engine run stay one line."""

from __future__ import annotations

from ignite.engine import Engine, Events


class UserErrors:
    """Re-raise bad-input errors (``ValueError``, ``FileNotFoundError``: a refused file, a full disk) as soon as an
    engine reports them, so that MONAI's ``StatsHandler`` attached after it does not log their chained tracebacks;
    the command prints them as one line. Other errors go on to ``StatsHandler``, which logs the traceback.

    Ignite runs the ``EXCEPTION_RAISED`` handlers in order until one raises: attach this one after handlers that
    must clean up (``PseudoLabelWriter``) and before ``StatsHandler``.
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EXCEPTION_RAISED, self)

    def __call__(self, engine: Engine, error: Exception) -> None:
        if isinstance(error, (ValueError, FileNotFoundError)):
            raise error
