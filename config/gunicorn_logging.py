"""gunicorn's logger for `manage.py serve`, with its "Listening at:" line naming the address it listens on."""
from __future__ import annotations

from typing import Any

from gunicorn import glogging


class Logger(glogging.Logger):
    """gunicorn's own logger, except for one line. With --reuse-port the arbiter binds no socket (each worker binds
    its own), so gunicorn announces "Listening at:  (pid)" with an empty list of sockets; the line names the --bind
    addresses instead, which is where the workers listen."""

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if msg.startswith("Listening at:") and args and not args[0]:
            args = (",".join(self.cfg.bind), *args[1:])
        super().info(msg, *args, **kwargs)
