"""The aggregator's side of the SuperLink: Flower's Grid calls, made to last.

`Messenger` is what the aggregator sends and receives through: every Runtime API call is
retried while the SuperLink fails transiently (`superlink_call`), replies are paired with the
node they answer for by `reply_to_message_id`, and a message that got no answer from a node
still connected is sent again (`message-retries`). Nothing here knows what a message carries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import httpx
from flwr.app import Message
from flwr.serverapp import Grid

from .config import RunConfig
from .errors import RunFailed
from .reporting import progress

log = logging.getLogger("fedssl.aggregator")

T = TypeVar("T")
SUPERLINK_RETRY_SECONDS = 300.0  # how long a SuperLink call is retried while it fails transiently
PULL_INTERVAL_SECONDS = 1.0  # between pulls for replies (Flower's Grid.send_and_receive waits 3 s; a round here can take 5 s)


def superlink_call(what: str, call: Callable[[], T], *, retry_seconds: float = SUPERLINK_RETRY_SECONDS) -> T:
    """One Runtime API call, retried with backoff while the SuperLink fails transiently.

    Flower's own client retries 502/503/504 and dropped connections, not a 500; the SuperLink
    answers 500 while its SQLite state stays locked by a burst of writes (many hospitals
    pushing their models at once), which passes. A 4xx is a real error and is raised at once.
    """
    deadline = time.monotonic() + retry_seconds
    delay = 1.0
    while True:
        try:
            return call()
        except (httpx.HTTPStatusError, httpx.TransportError) as e:
            transient = not isinstance(e, httpx.HTTPStatusError) or e.response.status_code >= 500
            if not transient or time.monotonic() + delay > deadline:
                raise
            progress("SuperLink %s failed (%s); trying again in %.0fs", what, _short(e), delay)
            time.sleep(delay)
            delay = min(2 * delay, 15.0)


def _copy(m: Message) -> Message:
    """The same message as a new one (new id): for sending again."""
    return Message(m.content, dst_node_id=m.metadata.dst_node_id, message_type=m.metadata.message_type,
                   group_id=m.metadata.group_id)


def _short(e: Exception) -> str:
    if isinstance(e, httpx.HTTPStatusError):
        return f"HTTP {e.response.status_code}"
    return f"{type(e).__name__}: {e}"


class Messenger:
    """Sends Messages to nodes and brings back their replies, over `grid`; `cfg` gives the
    wait for replies (`round-timeout`) and the re-sends (`message-retries`)."""

    def __init__(self, grid: Grid, cfg: RunConfig) -> None:
        self.grid, self.cfg = grid, cfg

    def node_ids(self) -> list[int]:
        """The nodes connected to the SuperLink now."""
        return superlink_call("get-nodes", lambda: list(self.grid.get_node_ids()))

    def push(self, msgs: list[Message]) -> dict[str, int]:
        """Push messages; returns message id → destination node. A push that failed part way
        is retried with fresh copies (new ids): the SuperLink may hold the first ones already,
        and their late replies are ignored."""
        attempts = 0

        def push() -> list[str]:
            nonlocal attempts
            sent = [_copy(m) for m in msgs] if attempts else msgs
            attempts += 1
            ids = list(self.grid.push_messages(sent))
            if len(ids) != len(sent):  # Flower logs a 413 (payload too large) and returns []
                raise RunFailed(f"the SuperLink took {len(ids)} of {len(sent)} messages ({sent[0].metadata.group_id}); "
                                "see the SuperLink's log above")
            return ids

        ids = superlink_call("push-messages", push)
        return {mid: m.metadata.dst_node_id for mid, m in zip(ids, msgs, strict=True) if mid}

    def send_and_receive(self, msgs: list[Message]) -> dict[int, Message]:
        """Grid.send_and_receive with every SuperLink call retried on transient failures;
        replies by the node they answer for, matched on `reply_to_message_id`."""
        waiting = self.push(msgs)
        deadline = time.monotonic() + self.cfg.round_timeout
        out: dict[int, Message] = {}
        while waiting:
            for reply in superlink_call("pull-messages", lambda: list(self.grid.pull_messages(list(waiting)))):
                node = waiting.pop(reply.metadata.reply_to_message_id, None)
                if node is None:  # not one we are waiting for
                    log.warning("ignoring a reply to unknown message %r", reply.metadata.reply_to_message_id)
                    continue
                out[node] = reply
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(PULL_INTERVAL_SECONDS)
        return out

    def exchange(self, msgs: list[Message]) -> tuple[dict[int, Message], list[int]]:
        """Send, wait up to round-timeout, and pair every reply with the node it was sent to.

        Replies are matched on `reply_to_message_id`, never on `src_node_id`: when a node is
        gone, the SuperLink answers in its place with an error whose source is the SuperLink
        itself. A node that is still connected but never answered (its ClientApp task was
        lost, or the SuperLink lost its reply) gets the message again, `message-retries`
        times. Returns (replies by node, nodes that never answered).
        """
        out: dict[int, Message] = {}
        pending = list(msgs)
        for attempt in range(self.cfg.message_retries + 1):
            out.update(self.send_and_receive(pending))
            if attempt == self.cfg.message_retries:
                break
            connected = set(self.node_ids())
            pending = [_copy(m) for m in pending if m.metadata.dst_node_id not in out and m.metadata.dst_node_id in connected]
            if not pending:
                break
            progress("no answer from node(s) %s within %.0fs (%s); sending again",
                     ", ".join(str(m.metadata.dst_node_id) for m in pending), self.cfg.round_timeout, pending[0].metadata.group_id)
        return out, [m.metadata.dst_node_id for m in msgs if m.metadata.dst_node_id not in out]
