"""pdserve on a real multi-node Ray cluster (several raylets on this machine, each with its own node id
and resources): pools spread over nodes, ``placement.pack_pairs`` honoured, KV between nodes over the
cross-host transport, a dead node's workers marked unhealthy and no stream left hanging. The cluster
runs in its own process (``tests/support/multinode_check.py``): it cannot share the session's Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_multinode_cluster_places_pairs_serves_and_survives_a_node() -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-m", "tests.support.multinode_check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=420)
    lines = [line for line in done.stdout.splitlines() if line.startswith("FINDINGS ")]
    assert done.returncode == 0 and lines, f"rc={done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    found = json.loads(lines[-1].removeprefix("FINDINGS "))
    assert found["pinned_placement"] == {"prefill-0": 0, "decode-0": 1} and found["pinned_outputs_match"] is True
    placement = found["placement"]
    # pack_pairs: prefill-i and decode-i share a node, and the two pairs use both nodes
    assert all(placement[f"prefill-{i}"] == placement[f"decode-{i}"] >= 0 for i in range(2)), placement
    assert {placement["decode-0"], placement["decode-1"]} == {0, 1}, placement
    assert found["outputs_match"] is True
    assert found["transports"] == {"decode-0": ["gloo"], "decode-1": ["gloo"]}
    assert found["peers"] == {"decode-0": 1, "decode-1": 1}  # each took its prompts from its node's worker
    # node 1 removed mid-stream: its two workers unhealthy, no stream hung, all ended with their tokens
    # (moved to the surviving decode worker) or a clear error; the surviving node still serves
    assert found["hung"] == 0
    assert sorted(found["unhealthy"]) == sorted(w for w, n in placement.items() if n == 1)
    assert all(s == "ok" or "Error" in s for s in found["streams"]), found["streams"]
    assert found["after"] is True
