"""Deployment end to end: TLS SuperLink with SuperNode authentication and real SuperNodes on loopback.

Uses the deploy/ scripts exactly as docs/deployment.md tells users to, on one machine: each SuperNode
has its own FLWR_HOME, port, key pair and node config; nothing but the CA certificate is shared.
"""

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from alignfl_app.config import resolve_data_root
from alignfl_app.tools.local_superlink import BIN
from tests.deployment_harness import DEPLOY, deployment_federation

pytestmark = pytest.mark.e2e

SILOS = {  # silo name -> node config (own architecture, own data root, silo 2 picks its own classes)
    "hospital-a": 'partition-id=0 silo-name="hospital-a" architecture="mlp-small" data-root="{root}"',
    "hospital-b": 'partition-id=1 silo-name="hospital-b" architecture="conv" data-root="{root}"',
    "lab-c": 'partition-id=2 silo-name="lab-c" architecture="mlp-small" data-root="{root}" classes="6,7"',
}


def test_tls_authenticated_federation_runs_and_refuses_unregistered_silo(tmp_path):
    results = tmp_path / "results"
    root = str(resolve_data_root())
    run_config = (
        f"results-dir='{results}' run-name='deployed' num-server-rounds=1 max-per-class=60 outliers-per-silo=12 "
        "local-epochs=1 batch-size=32 synthetic-per-silo=40 server-epochs=1 silo-classes='0,1;2,3;4,5' "
        "sample-grid-per-silo=2 round-timeout=300"
    )
    with deployment_federation(tmp_path / "fed") as fed:
        for silo, node_config in SILOS.items():
            key = fed.make_key(silo)
            fed.register(key)
            fed.start_supernode(silo, node_config.format(root=root), key)
        fed.wait_online(3)

        intruder = fed.start_supernode("intruder", f'partition-id=0 silo-name="intruder" data-root="{root}"',
                                       fed.make_key("intruder"))  # key made but never registered
        try:
            intruder.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("a SuperNode with an unregistered key stayed connected")
        assert intruder.returncode != 0
        assert "Failed to activate SuperNode" in fed.supernode_log("intruder"), fed.supernode_log("intruder")[-2000:]
        assert fed.online_nodes() == 3

        run, log = fed.run_app(run_config, num_supernodes=None, timeout=600)
        assert run["status"] == "finished:completed", log[-4000:] + fed.log.read_text()[-3000:]
        assert all(p.poll() is None for name, p in fed.supernodes.items() if name != "intruder")

    summary = json.loads((results / "deployed" / "summary.json").read_text())
    assert summary["status"] == "completed" and [r["round"] for r in summary["rounds"]] == [1]
    last = summary["rounds"][-1]
    assert last["generators-used"] == ["hospital-a", "hospital-b", "lab-c"] and last["rejected-replies"] == []
    assert {s: m["architecture"] for s, m in last["silos"].items()} == {
        "hospital-a": "mlp-small", "hospital-b": "conv", "lab-c": "mlp-small"}
    assert last["silos"]["lab-c"]["classes"] == ["6", "7"]
    assert last["silos"]["hospital-a"]["num-outliers"] == 12
    assert 0.0 <= summary["final-global-accuracy"] <= 1.0
    assert set(summary["final-per-silo-accuracy"]) == set(SILOS)


def test_start_supernode_rejects_a_bad_node_config_in_one_line(tmp_path):
    key, ca = tmp_path / "k", tmp_path / "ca.crt"
    key.write_text("x")
    ca.write_text("x")
    res = subprocess.run([str(DEPLOY / "start-supernode.sh"), "127.0.0.1:1", str(ca), str(key),
                          'partition-id=0 silo-nam="a"'], capture_output=True, text=True, timeout=60,
                         env={"ALIGNFL_BIN": str(BIN), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "silo-nam" in lines[0] and "node config" in lines[0], res.stderr


# --- the operator's keys: never overwritten, never readable by others -------------------------------------------

def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(DEPLOY / name), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ALIGNFL_BIN": str(BIN)})


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_make_certs_never_replaces_the_ca_or_a_key_and_keeps_them_private(tmp_path):
    certs = tmp_path / "certs"
    assert script("make-certs.sh", str(certs)).returncode == 0
    assert (mode(certs), mode(certs / "ca.key"), mode(certs / "server.key")) == (0o700, 0o600, 0o600)
    assert (mode(certs / "ca.crt"), mode(certs / "server.pem")) == (0o644, 0o644)
    before = {f.name: f.read_bytes() for f in certs.iterdir()}

    (certs / "ca.key").chmod(0o644)
    certs.chmod(0o755)
    again = script("make-certs.sh", str(certs), "coordinator.example.org")
    assert again.returncode == 1 and len(again.stderr.strip().splitlines()) == 1, again.stderr
    assert "never overwritten" in again.stderr and "move" in again.stderr
    assert {f.name: f.read_bytes() for f in certs.iterdir()} == before
    assert (mode(certs), mode(certs / "ca.key")) == (0o700, 0o600)  # loose modes are tightened even on refusal

    # new hosts: the same CA signs a new server certificate once the old one is moved away
    for name in ("server.pem", "server.key"):
        (certs / name).rename(tmp_path / name)
    renewed = script("make-certs.sh", str(certs), "coordinator.example.org")
    assert renewed.returncode == 0 and "existing CA kept" in renewed.stdout, renewed.stderr
    assert (certs / "ca.crt").read_bytes() == before["ca.crt"] and (certs / "ca.key").read_bytes() == before["ca.key"]
    assert (certs / "server.key").read_bytes() != before["server.key"] and mode(certs / "server.key") == 0o600
    assert subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.crt"), str(certs / "server.pem")],
                          capture_output=True).returncode == 0

    (certs / "ca.key").unlink()  # half a CA is refused, not silently replaced by a new one
    for name in ("server.pem", "server.key"):
        (certs / name).unlink()
    half = script("make-certs.sh", str(certs))
    assert half.returncode == 1 and "half a CA" in half.stderr and not (certs / "ca.key").exists()
    assert (certs / "ca.crt").read_bytes() == before["ca.crt"]


def test_supernode_and_signing_keys_are_never_overwritten_and_private(tmp_path):
    silo_keys, operator = tmp_path / "silo-keys", tmp_path / "operator"
    assert script("make-supernode-key.sh", str(silo_keys), "hospital-a").returncode == 0
    assert script("make-app-signing-key.sh", str(operator), "operator").returncode == 0
    assert (mode(silo_keys), mode(silo_keys / "hospital-a"), mode(silo_keys / "hospital-a.pub")) == (0o700, 0o600, 0o644)
    assert (mode(operator), mode(operator / "operator"), mode(operator / "trusted-entities.yaml")) == (0o700, 0o600, 0o644)
    trusted = yaml.safe_load((operator / "trusted-entities.yaml").read_text())
    assert list(trusted) == ["operator"] and trusted["operator"].startswith("ssh-ed25519 ")

    for folder, cmd, name in ((silo_keys, "make-supernode-key.sh", "hospital-a"),
                              (operator, "make-app-signing-key.sh", "operator")):
        before = {f.name: f.read_bytes() for f in folder.iterdir()}
        (folder / name).chmod(0o644)
        again = script(cmd, str(folder), name)
        assert again.returncode == 1 and len(again.stderr.strip().splitlines()) == 1, again.stderr
        assert "never overwritten" in again.stderr
        assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
        assert mode(folder / name) == 0o600
