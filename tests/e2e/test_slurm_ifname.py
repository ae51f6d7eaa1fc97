"""Multi-node launches pin gloo's and NCCL's socket interface (slurm/socket_ifname.sh, slurm/launch.sh).

``launch.sh`` runs here with a stub ``scontrol`` (the job's node list) in a dry run: the planner runs
for real, torchrun does not start. No Slurm needed (tests/e2e/test_slurm.py runs the real one).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IFNAME = ROOT / "slurm" / "socket_ifname.sh"


def _neighbour() -> tuple[str, str]:
    """(an address on a directly connected network other than ours, its interface), or skip."""
    if shutil.which("ip") is None:
        pytest.skip("no iproute2 here")
    routes = subprocess.run(["ip", "-o", "-4", "route", "show", "scope", "link"], capture_output=True, text=True)
    for line in routes.stdout.splitlines():
        m = re.match(r"(\d+\.\d+\.\d+\.\d+/\d+) dev (\S+).*?(?:src (\S+))?\s*$", line)
        if not m or m.group(2) == "lo":
            continue
        net = ipaddress.ip_network(m.group(1), strict=False)
        for host in net.hosts():
            if str(host) != m.group(3):
                return str(host), m.group(2)
    pytest.skip("no directly connected IPv4 network here")


def test_interface_towards_a_neighbour():
    addr, dev = _neighbour()
    out = subprocess.run(["bash", str(IFNAME), addr], capture_output=True, text=True)
    assert (out.returncode, out.stdout.strip()) == (0, dev), out.stderr


@pytest.mark.parametrize(
    ("host", "message"), [("127.0.0.1", "reached over lo"), ("no-such-host.invalid", "cannot resolve")]
)
def test_loopback_or_unknown_peer_is_refused(host, message):
    out = subprocess.run(["bash", str(IFNAME), host], capture_output=True, text=True)
    assert out.returncode == 1 and message in out.stderr, out


def _dry_run(tmp_path: Path, nodes: list[str], this_node: str, **extra: str) -> subprocess.CompletedProcess:
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "scontrol").write_text("#!/bin/sh\nprintf '%s\\n' " + " ".join(nodes) + "\n")
    (stub / "scontrol").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    env.update(
        PATH=f"{stub}:{env['PATH']}",
        PYTHON=sys.executable,
        SLURM_JOB_ID="7",
        SLURM_JOB_NODELIST=",".join(nodes),
        SLURM_NNODES=str(len(nodes)),
        SLURM_NODEID="0",
        SLURM_PROCID="0",
        SLURMD_NODENAME=this_node,
        GPUS_PER_NODE="2",
        GPU_MEMORY_GB="80",
        MODEL_CONFIG=str(ROOT / "configs" / "models" / "tiny-qwen2.json"),
        LOG_DIR=str(tmp_path / "logs"),
        OMP_NUM_THREADS="1",
        **extra,
    )
    return subprocess.run(
        ["bash", "slurm/launch.sh", "--dry-run", "--config", "configs/tiny_cpu.yaml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.e2e
def test_launcher_exports_the_interface_towards_another_node(tmp_path):
    addr, dev = _neighbour()
    out = _dry_run(tmp_path, ["this-node", addr], "this-node")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"gloo_ifname={dev} nccl_ifname={dev}" in out.stdout, out.stdout
    # what the site sets wins
    out = _dry_run(tmp_path, ["this-node", addr], "this-node", GLOO_SOCKET_IFNAME="ib7", NCCL_SOCKET_IFNAME="ib7")
    assert out.returncode == 0 and "gloo_ifname=ib7 nccl_ifname=ib7" in out.stdout, out.stdout + out.stderr


@pytest.mark.e2e
def test_launcher_refuses_a_peer_it_cannot_reach_over_the_network(tmp_path):
    out = _dry_run(tmp_path, ["this-node", "127.0.0.1"], "this-node")
    assert out.returncode == 2, out.stdout + out.stderr
    assert (
        "no network interface reaches 127.0.0.1: set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME"
        in out.stdout + out.stderr
    )
