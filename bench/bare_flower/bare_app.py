"""Flower's floor for fedssl's payload: train messages whose handlers return at once.

The ServerApp waits for `min-nodes` SuperNodes, then per round sends every node one Array of
`payload-bytes` (fedssl sends its weights as one packed Array too), pulls the replies every
1 s (as fedssl's aggregator does) and records the round's wall time; `out` gets the JSON.
"""

import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@client.train()
def echo(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"w": msg.content["w"]}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    while len(nodes := sorted(grid.get_node_ids())) < int(cfg["min-nodes"]):
        time.sleep(1.0)
    payload = np.zeros(int(cfg["payload-bytes"]), dtype=np.uint8)
    rounds = []
    for rnd in range(1, int(cfg["rounds"]) + 1):
        t0 = time.monotonic()
        msgs = [Message(RecordDict({"w": ArrayRecord({"packed": Array(payload)})}), dst_node_id=n,
                        message_type=MessageType.TRAIN, group_id=f"bare-{rnd}") for n in nodes]
        waiting = set(grid.push_messages(msgs))
        while waiting:
            for reply in grid.pull_messages(list(waiting)):
                waiting.discard(reply.metadata.reply_to_message_id)
            if waiting:
                time.sleep(1.0)
        rounds.append({"round": rnd, "round_seconds": time.monotonic() - t0})
        print(f"[bare] round {rnd}: {rounds[-1]['round_seconds']:.2f}s", flush=True)
    if cfg["out"]:
        with open(str(cfg["out"]), "w") as f:
            json.dump({"nodes": len(nodes), "payload_bytes": int(cfg["payload-bytes"]), "rounds": rounds}, f)
