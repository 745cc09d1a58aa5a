"""The federation's hospitals as the aggregator knows them: who joined, on which node, with what data.

A hospital is a SuperNode that answered the `describe` query with its name (node config
`hospital`), SSL task, class names and data audit (`client_app.parse_info`). `Hospitals`
waits for `min-hospitals` at start-up, describes every node the first time it is seen (at
start-up a failing hospital fails the run; later one is skipped), and follows a hospital that
comes back as a new SuperNode under its name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedssl_core import names
from flwr.app import Message, MessageType, RecordDict

from . import records
from .client_app import parse_info
from .config import RunConfig
from .errors import RunFailed
from .messaging import Messenger
from .reporting import progress

log = logging.getLogger("fedssl.aggregator")


@dataclass
class Hospital:
    name: str
    ssl_task: str
    class_names: list[str]
    audit: dict[str, Any]
    node_ids: list[int] = field(default_factory=list)


class Hospitals(Mapping[int, Hospital]):
    """Node id → hospital, for the nodes described so far; `class_names` is the federation's
    class list (the first hospital's, which every other must match), `nodes_with_model` the
    nodes that hold the full model already."""

    def __init__(self, messenger: Messenger, cfg: RunConfig) -> None:
        self.messenger, self.cfg = messenger, cfg
        self.by_node: dict[int, Hospital] = {}
        self.class_names: list[str] = []
        self.nodes_with_model: set[int] = set()

    def __getitem__(self, node: int) -> Hospital:
        return self.by_node[node]

    def __iter__(self) -> Iterator[int]:
        return iter(self.by_node)

    def __len__(self) -> int:
        return len(self.by_node)

    def wait(self) -> list[int]:
        """The connected nodes, once there are `min-hospitals` of them; RunFailed after
        `wait-for-hospitals` seconds with fewer."""
        deadline = time.monotonic() + self.cfg.wait_for_hospitals
        while True:
            nodes = sorted(self.messenger.node_ids())
            if len(nodes) >= self.cfg.min_hospitals:
                return nodes
            if time.monotonic() > deadline:
                raise RunFailed(
                    f"only {len(nodes)} hospital(s) connected after {self.cfg.wait_for_hospitals:.0f}s; "
                    f"min-hospitals is {self.cfg.min_hospitals}: start more SuperNodes or lower min-hospitals"
                )
            time.sleep(1.0)

    def describe(self, node_ids: list[int], *, strict: bool) -> None:
        """Ask new nodes who they are and what data they hold. At start-up (strict) any
        failing hospital fails the run with its error; later a failing node is skipped."""
        new = [n for n in node_ids if n not in self.by_node]
        if not new:
            return
        msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY, group_id="describe") for n in new]
        replies, missing = self.messenger.exchange(msgs)
        errors = []
        for node, reply in sorted(replies.items()):
            if reply.has_error():
                errors.append(f"node {node}: {reply.error.reason}")
                continue
            info = parse_info(reply.content[records.INFO])
            hospital = Hospital(info["hospital"], info["ssl-task"], list(info["class-names"]), info["audit"], [node])
            if self.class_names and hospital.class_names != self.class_names:
                errors.append(f"hospital {hospital.name} has classes {hospital.class_names}, others {self.class_names}")
                continue
            same_name = [n for n, h in self.by_node.items() if h.name == hospital.name]
            if same_name and strict:
                errors.append(f"nodes {same_name[0]} and {node} both say they are hospital {hospital.name!r}: "
                              "give every SuperNode its own `hospital` in --node-config")
                continue
            for old in same_name:  # the hospital came back as a new SuperNode: its old node is gone
                hospital.node_ids = self.by_node.pop(old).node_ids + [node]
                self.nodes_with_model.discard(old)
                progress("hospital %s reconnected as node %s (was node %s)", hospital.name, node, old)
            self.class_names = self.class_names or hospital.class_names
            self.by_node[node] = hospital
            ssl = self.cfg.task == names.RUN_DIAGNOSIS and self.cfg.ssl_rounds > 0  # its SSL task matters only then
            progress("hospital %s joined (node %s): %s%s data, %d train / %d test images",
                     hospital.name, node, f"ssl-task={hospital.ssl_task}, " if ssl else "", hospital.audit.get("data_source"),
                     hospital.audit.get("train_examples", 0), hospital.audit.get("test_examples", 0))
        errors += [f"node {n}: no answer within {self.cfg.round_timeout:.0f}s" for n in sorted(missing)]
        if errors and strict:
            raise RunFailed("hospital(s) failed at start-up: " + "; ".join(errors))
        for e in errors:
            log.warning("skipping a hospital this round: %s", e)

    def connected(self) -> list[int]:
        """The connected nodes that are known hospitals, newcomers described first."""
        nodes = sorted(self.messenger.node_ids())
        self.describe(nodes, strict=False)
        return [n for n in nodes if n in self.by_node]

    def names(self) -> list[str]:
        return sorted({h.name for h in self.by_node.values()})

    def data_facts(self) -> tuple[str, bool]:
        """The hospitals' data source ("mixed:a,b" when they differ) and whether any is synthetic."""
        sources = sorted({h.audit.get("data_source", "?") for h in self.by_node.values()})
        synthetic = any(h.audit.get("synthetic_data") for h in self.by_node.values())
        return (sources[0] if len(sources) == 1 else "mixed:" + ",".join(sources)), synthetic
