"""Several gateways, one state: nginx (generated config) -> two `shipyard serve` processes sharing a real
redis-server -> the same engines (benchmarks/gateway_failover.py, with fake engines so it takes seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.services import tool


def test_two_gateways_behind_nginx_follow_one_state_and_survive_a_sigkill(tmp_path: Path, repo_root: Path) -> None:
    tool("redis-server", "apt-get install redis-server")
    tool("nginx", "apt-get install nginx-light")
    done = subprocess.run(
        [sys.executable, str(repo_root / "benchmarks" / "gateway_failover.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "failover.json").read_text())

    follow = report["follow"]
    assert follow["phase"] == "done" and follow["served_by_gateway2"] == "v2", follow
    assert follow["gateway2_followed_after_s"] is not None and follow["gateway2_followed_after_s"] <= 1.0, follow

    kill = report["kill"]
    assert kill["requests_after_the_kill"] > 0 and kill["requests_failed_after_the_kill"] == 0, kill
    assert kill["streams_started_after_the_kill"] > 0 and kill["streams_failed_after_the_kill"] == 0, kill
    assert kill["streams_cut_by_the_kill"] <= kill["streams"], kill  # counted: the streams that were on gateway 1
    assert kill["served_by_gateway2_after"] == 200

    restart = report["restart"]
    assert restart["same_engines"] and restart["serves"] == "v2", restart
    assert restart["ready_after_s"] <= 5.0, restart
