"""The instance's endpoints: the control socket and the metrics listener, served by the loop.

Owns where the control socket lives, opening both listeners, and the life of their clients in
the loop: accept, serve, time out, close (listener.py speaks the HTTP), and what each path
answers: ``GET /status`` the snapshot as JSON (metrics.py), ``POST /reload`` the reload's
outcome, ``GET /metrics`` the Prometheus text format. The metrics listener answers only
``/metrics``: a reload is never asked for from the network.

The control socket is always there unless ``control_socket = "off"``: ``tradebalancer status``
and ``tradebalancer reload`` talk to it, so neither needs the metrics listener. Under systemd
it is ``$RUNTIME_DIRECTORY/control``, the unit's ``RuntimeDirectory=tradebalancer/NAME``,
i.e. ``/run/tradebalancer/NAME/control``, which is where the commands look for it. A balancer
run by hand as root uses the same path, and as another user
``$XDG_RUNTIME_DIR/tradebalancer/NAME/control``. The socket is 0600 in a 0700 directory: only
the service's user and root may ask for its status or a reload.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Mapping

import orjson

from . import metrics
from .address import Address
from .config import FeedConfig
from .listener import Client, Listener, Response, open_listener, text
from .poller import Poller
from .values import expand_variables

__all__ = ["Endpoints", "control_path"]

logger = logging.getLogger(__name__)


def control_path(name: str, setting: str, environ: Mapping[str, str]) -> str | None:
    """The control socket's path for feed ``name`` (None: ``off``)."""
    if setting == "off":
        return None
    if setting != "auto":
        return expand_variables(setting, environ, f"feeds.{name}.control_socket")
    if runtime := environ.get("RUNTIME_DIRECTORY"):
        return os.path.join(runtime.split(":")[0], "control")
    if os.geteuid() == 0:
        return f"/run/tradebalancer/{name}/control"
    base = environ.get("XDG_RUNTIME_DIR") or f"/tmp/tradebalancer-{os.geteuid()}"
    return os.path.join(base, "tradebalancer", name, "control")


def _private_directory(path: str) -> None:
    """Make the automatic socket's directory, or check one that exists: a directory (not a
    link), ours, and 0700 (made so if it is ours); OSError saying what is wrong otherwise.
    Another user who made it first could otherwise swap the socket under status and reload."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise OSError(errno.EPERM, f"{path} is not a directory of this user (uid {os.geteuid()})")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700)


class Endpoints:
    """The listeners of one instance and their clients, watched by the loop's poller."""

    def __init__(self, poller: Poller) -> None:
        self.poller = poller
        self.listeners: list[Listener] = []
        self.clients: list[Client] = []

    def open(
        self,
        config: FeedConfig,
        environ: Mapping[str, str],
        *,
        reload: Callable[[], tuple[bool, str]],
        snapshot: Callable[[], metrics.Snapshot],
    ) -> None:
        """Open the control socket and, if configured, the metrics listener.

        A control socket that cannot be made is a warning (the feed runs on without it); a
        metrics listener that cannot listen is an error the caller stops on, as a typo in its
        address would otherwise leave every dashboard silently empty.
        """

        def answer_metrics(method: str, path: str) -> Response:
            if path != "/metrics":
                return text(404, "tradebalancer serves /metrics here\n")
            if method != "GET":
                return text(405, "use GET\n")
            body = metrics.exposition(snapshot())
            return Response(200, "text/plain; version=0.0.4; charset=utf-8", body)

        def answer_control(method: str, path: str) -> Response:
            if (method, path) == ("POST", "/reload"):
                ok, message = reload()
                return text(200 if ok else 409, message + "\n")
            if (method, path) == ("GET", "/status"):
                return Response(200, "application/json", orjson.dumps(snapshot()))
            if path == "/metrics":
                return answer_metrics(method, path)
            return text(
                404, "this control socket answers GET /status, POST /reload, GET /metrics\n"
            )

        path = control_path(config.name, config.control_socket, environ)
        if path is not None:
            try:
                if config.control_socket == "auto":
                    _private_directory(os.path.dirname(path))
                else:  # the administrator's choice: made if missing, else left as it is
                    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
                self._add(open_listener(Address("unix", path=path), answer_control, "control"))
            except OSError as exc:
                logger.warning(
                    "no control socket at %s (%s): `tradebalancer status` and `reload` cannot "
                    "reach this instance; SIGHUP still reloads",
                    path,
                    exc.strerror or exc,
                )
        if config.metrics is not None:
            listener = open_listener(config.metrics, answer_metrics, "metrics", mode=0o666)
            self._add(listener)
            logger.info("metrics for Prometheus on http://%s/metrics", listener.address)

    def _add(self, listener: Listener) -> None:
        self.listeners.append(listener)
        self.poller.watch_fd(listener.fileno(), listener)

    def serve(self, tag: Listener | Client, now: float) -> None:
        """A listener or a client is ready: accept, or read and write."""
        if isinstance(tag, Listener):
            for client in tag.accept(now):
                self.clients.append(client)
                self.poller.watch_fd(client.fileno(), client)
            return
        tag.serve()
        if tag.done:
            self._close(tag)
        elif tag.writing:
            self.poller.watch_fd(tag.fileno(), tag, write=True)

    def deadline(self) -> float | None:
        """When the oldest client times out."""
        return min((client.deadline for client in self.clients), default=None)

    def tick(self, now: float) -> None:
        """Close the clients that took too long."""
        for client in [c for c in self.clients if now >= c.deadline]:
            self._close(client)

    def close(self) -> None:
        """Close every client and listener."""
        for client in list(self.clients):
            self._close(client)
        for listener in self.listeners:
            self.poller.unwatch_fd(listener.fileno())
            listener.close()
        self.listeners = []

    def _close(self, client: Client) -> None:
        self.poller.unwatch_fd(client.fileno())
        client.close()
        self.clients.remove(client)
