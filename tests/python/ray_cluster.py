"""A throw-away multi-node Ray cluster on this machine, for the Ray backend's tests.

    python ray_cluster.py NODE_RESOURCE...

Starts a head node (1 CPU, no dashboard) and one worker node per argument,
each with 2 CPUs and a custom resource of that name (`{NAME: 1}`), so a test
can pin a stage to a "node" with `resources = {NAME = 1}`. Once every node
has joined it prints one JSON line:

    {"address": "IP:PORT", "nodes": {"NAME": {"node_id": "...", "ip": "..."}}}

then answers one JSON request per stdin line with one JSON line:

    {"op": "remove_node", "resource": "NAME"}  -> {"op": "removed"}
        kills that worker node's processes (a lost machine, as the cluster
        sees it; graceful unless "graceful": false is given);
    {"op": "placement_groups"}  -> {"op": "placement_groups", "live": N}
        placement groups not yet REMOVED;
    {"op": "actors"}            -> {"op": "actors", "alive": N}
        actors in state ALIVE.
A bad request is answered {"op": "error", "message": "..."}.

EOF on stdin, SIGTERM or SIGINT shuts the cluster down and exits 0; the
cluster is shut down on every exit path. Exits 3 with "SKIP: ..." on stderr
when ray is not installed, so a test can skip instead of failing.

Only protocol lines go to stdout: Ray's own output is sent to stderr.
"""
import json
import os
import signal
import sys
import time

# Ray and its subprocesses sometimes print to fd 1: keep a private copy of
# stdout for the protocol and send fd 1 (and sys.stdout) to stderr.
_PROTOCOL = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
os.dup2(2, 1)
sys.stdout = sys.stderr

try:
    import ray
    from ray.cluster_utils import Cluster
except ImportError as e:
    print(f"SKIP: ray is not installed: {e}", file=sys.stderr)
    sys.exit(3)


def send(obj: dict) -> None:
    _PROTOCOL.write(json.dumps(obj) + "\n")
    _PROTOCOL.flush()


def on_signal(signum, _frame):
    # Unwind through the `finally` below, which shuts the cluster down.
    raise SystemExit(0)


def handle_signals(handler) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def main() -> int:
    names = sys.argv[1:]
    if len(set(names)) != len(names):
        print(f"node resource names must be distinct: {names}", file=sys.stderr)
        return 2
    handle_signals(on_signal)

    cluster = None
    try:
        started = time.monotonic()
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "include_dashboard": False},
        )
        nodes = {
            name: cluster.add_node(num_cpus=2, resources={name: 1}, include_dashboard=False)
            for name in names
        }
        cluster.wait_for_nodes()
        # Each node installs a SIGTERM handler that stops only itself and
        # exits 1: take SIGTERM back.
        handle_signals(on_signal)
        print(f"ray_cluster: {len(names) + 1} nodes up in "
              f"{time.monotonic() - started:.1f} s at {cluster.address}", file=sys.stderr)
        send({
            "address": cluster.address,
            "nodes": {n: {"node_id": node.node_id, "ip": node.node_ip_address}
                      for n, node in nodes.items()},
        })

        # The cluster's own GCS client answers these without a driver or the
        # dashboard (which `ray.util.state` would need).
        state = cluster.global_state
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                req = json.loads(line)
                op = req["op"]
                if op == "remove_node":
                    name = req["resource"]
                    if name not in nodes:
                        raise ValueError(f"no live node with resource {name!r}")
                    cluster.remove_node(nodes.pop(name),
                                        allow_graceful=req.get("graceful", True))
                    send({"op": "removed"})
                elif op == "placement_groups":
                    table = state.placement_group_table()
                    live = sum(1 for pg in table.values() if pg["state"] != "REMOVED")
                    send({"op": "placement_groups", "live": live})
                elif op == "actors":
                    table = state.actor_table(None)
                    alive = sum(1 for a in table.values() if a["State"] == "ALIVE")
                    send({"op": "actors", "alive": alive})
                else:
                    raise ValueError(f"unknown op {op!r}")
            except Exception as e:  # a bad request must not take the cluster down
                send({"op": "error", "message": f"{type(e).__name__}: {e}"})
        return 0
    finally:
        if cluster is not None:
            # Ignore further signals: a second SIGTERM must not interrupt
            # the shutdown and leave raylets behind.
            handle_signals(signal.SIG_IGN)
            cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
