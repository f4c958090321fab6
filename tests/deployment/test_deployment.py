"""Deployment end to end: TLS SuperLink on loopback behind the fleet front, SuperNode authentication, signed apps,
real SuperNodes on loopback.

Uses the deploy/ scripts exactly as docs/deployment.md tells users to, on one machine: each SuperNode
has its own FLWR_HOME, port, key pair and node config; nothing but the CA certificate and the operator's
trusted-entities file is shared.
"""

import hashlib
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import certifi
import pytest
import yaml
from flwr.proto.fab_pb2 import GetFabResponse  # pylint: disable=no-name-in-module
from flwr.supercore.fab import Fab
from flwr.supernode.start_client_internal import _verify_fab
from starlette.testclient import TestClient

from alignfl_app.config import resolve_data_root
from alignfl_app.tools.app_signing import make_signing_key, sign_fab
from alignfl_app.tools.fleet_front import create_app, sign_fab_reply
from alignfl_app.tools.local_superlink import BIN, flower_command, flower_env
from tests.conftest import PROJECT
from tests.deployment_harness import DEPLOY, deployment_federation

SILOS = {  # silo name -> node config (own architecture, own data root, silo 2 picks its own classes)
    "hospital-a": 'partition-id=0 silo-name="hospital-a" architecture="mlp-small" data-root="{root}"',
    "hospital-b": 'partition-id=1 silo-name="hospital-b" architecture="conv" data-root="{root}"',
    "lab-c": 'partition-id=2 silo-name="lab-c" architecture="mlp-small" data-root="{root}" classes="6,7"',
}
FAB_REFUSED = "FAB verification failed"  # Flower's SuperNode log line when no trusted entity signed the app


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not seen within {timeout:.0f} s")
        time.sleep(1.0)


@pytest.mark.e2e
def test_operator_only_federation_runs_signed_app_and_refuses_outsiders(tmp_path):
    results = tmp_path / "results"
    root = str(resolve_data_root())
    run_config = (
        f"results-dir='{results}' num-server-rounds=1 max-per-class=60 outliers-per-silo=12 "
        "local-epochs=1 batch-size=32 synthetic-per-silo=40 server-epochs=1 silo-classes='0,1;2,3;6,7' "
        f"silo-names='{';'.join(SILOS)}' "
        "sample-grid-per-silo=2 round-timeout=300"
    )
    with deployment_federation(tmp_path / "fed") as fed:
        node_ids = {}
        for silo, node_config in SILOS.items():
            key = fed.make_key(silo)
            node_ids[silo] = fed.register(key)
            fed.start_supernode(silo, node_config.format(root=root), key)
        fed.wait_online(3)
        run_config += " silo-nodes='" + ",".join(f"{s}={n}" for s, n in node_ids.items()) + "'"

        intruder = fed.start_supernode(
            "intruder", f'partition-id=0 silo-name="intruder" data-root="{root}"', fed.make_key("intruder")
        )  # key made but never registered
        try:
            intruder.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("a SuperNode with an unregistered key stayed connected")
        assert intruder.returncode != 0
        assert "Failed to activate SuperNode" in fed.supernode_log("intruder"), fed.supernode_log("intruder")[-2000:]
        assert fed.online_nodes() == 3

        # A machine with only ca.crt, pointed at the silo-facing port: no Control API there
        outsider = {**flower_env(tmp_path / "outsider-home", PROJECT), "ALIGNFL_BIN": str(BIN)}
        subprocess.run(
            [str(DEPLOY / "connect.sh"), "outside", f"127.0.0.1:{fed.front_port}", str(fed.certs / "ca.crt")],
            env=outsider,
            check=True,
            capture_output=True,
            timeout=60,
        )

        def outsider_flwr(*args: str) -> dict:
            """``flwr ... --format json`` as the outsider (flwr exits 0 on failure too; its JSON says success)."""
            res = subprocess.run(
                [flower_command("flwr"), *args, "--format", "json"],
                cwd=PROJECT,
                env=outsider,
                capture_output=True,
                text=True,
                timeout=300,
            )
            return json.loads(res.stdout)

        runs_before = fed.runs()
        listed = outsider_flwr("supernode", "ls", "outside")
        assert not listed["success"] and "404" in listed["error-message"] and "nodes" not in listed, listed
        own_key = fed.make_key("outsider")
        registered = outsider_flwr("supernode", "register", f"{own_key}.pub", "outside")
        assert not registered["success"] and "404" in registered["error-message"], registered
        started = outsider_flwr("run", str(PROJECT), "outside", "--run-config", run_config + " run-name='outsider'")
        assert not started["success"] and "404" in started["error-message"], started
        assert fed.runs() == runs_before and fed.online_nodes() == 3
        assert "refused POST /v1/control/" in fed.front_log.read_text()

        # The operator's app before it is signed: every SuperNode refuses it, no ClientApp runs
        res = fed.flwr(
            "run",
            str(PROJECT),
            "test",
            "--format",
            "json",
            "--run-config",
            run_config + " run-name='unsigned'",
            timeout=300,
        )
        unsigned_run = json.loads(res.stdout)["run-id"]
        wait_for(
            lambda: all(FAB_REFUSED in fed.supernode_log(s) for s in SILOS), 300, f"'{FAB_REFUSED}' on every SuperNode"
        )
        fed.flwr("stop", str(unsigned_run), "test", timeout=60)
        assert "has no operator signature" in fed.front_log.read_text()
        generators = results / "unsigned" / "generators"
        assert not generators.exists() or not any(generators.iterdir())

        # Signed by the operator: the federation runs it to the end
        fed.sign_app()
        run, log = fed.run_app(run_config + " run-name='deployed'", num_supernodes=None, timeout=600)
        assert run["status"] == "finished:completed", log[-4000:] + fed.log.read_text()[-3000:]
        assert all(p.poll() is None for name, p in fed.supernodes.items() if name != "intruder")

    summary = json.loads((results / "deployed" / "summary.json").read_text())
    assert summary["status"] == "completed" and [r["round"] for r in summary["rounds"]] == [1]
    last = summary["rounds"][-1]
    assert last["generators-used"] == ["hospital-a", "hospital-b", "lab-c"] and last["rejected-replies"] == []
    assert {s: m["architecture"] for s, m in last["silos"].items()} == {
        "hospital-a": "mlp-small",
        "hospital-b": "conv",
        "lab-c": "mlp-small",
    }
    assert last["silos"]["lab-c"]["classes"] == ["6", "7"]
    assert last["silos"]["hospital-a"]["num-outliers"] == 12
    assert 0.0 <= summary["final-global-accuracy"] <= 1.0
    assert set(summary["final-per-silo-accuracy"]) == set(SILOS)


def test_start_supernode_rejects_a_bad_node_config_in_one_line(tmp_path):
    key, ca, trusted = tmp_path / "k", tmp_path / "ca.crt", tmp_path / "trusted-entities.yaml"
    for f in (key, ca, trusted):
        f.write_text("x")
    res = subprocess.run(
        [
            str(DEPLOY / "start-supernode.sh"),
            "127.0.0.1:1",
            str(ca),
            str(key),
            str(trusted),
            'partition-id=0 silo-nam="a"',
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"ALIGNFL_BIN": str(BIN), "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "silo-nam" in lines[0] and "node config" in lines[0], res.stderr


# --- the operator's keys: never overwritten, never readable by others -------------------------------------------


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(DEPLOY / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ALIGNFL_BIN": str(BIN)},
    )


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
    assert (
        subprocess.run(
            ["openssl", "verify", "-CAfile", str(certs / "ca.crt"), str(certs / "server.pem")], capture_output=True
        ).returncode
        == 0
    )

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
    assert (mode(silo_keys), mode(silo_keys / "hospital-a"), mode(silo_keys / "hospital-a.pub")) == (
        0o700,
        0o600,
        0o644,
    )
    assert (mode(operator), mode(operator / "operator"), mode(operator / "trusted-entities.yaml")) == (
        0o700,
        0o600,
        0o644,
    )
    trusted = yaml.safe_load((operator / "trusted-entities.yaml").read_text())
    assert list(trusted) == ["operator"] and trusted["operator"].startswith("ssh-ed25519 ")

    for folder, cmd, name in (
        (silo_keys, "make-supernode-key.sh", "hospital-a"),
        (operator, "make-app-signing-key.sh", "operator"),
    ):
        before = {f.name: f.read_bytes() for f in folder.iterdir()}
        (folder / name).chmod(0o644)
        again = script(cmd, str(folder), name)
        assert again.returncode == 1 and len(again.stderr.strip().splitlines()) == 1, again.stderr
        assert "never overwritten" in again.stderr
        assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
        assert mode(folder / name) == 0o600


# --- app signatures: what the front attaches, checked by Flower's own SuperNode code ----------------------------


def fab_reply(content: bytes) -> bytes:
    reply = GetFabResponse()
    reply.fab.hash_str, reply.fab.content = hashlib.sha256(content).hexdigest(), content
    return reply.SerializeToString()


def supernode_accepts(reply_body: bytes, trusted_entities: Path) -> bool:
    """Flower 1.42's SuperNode check of a fetched FAB (``--trusted-entities``), on the front's reply."""
    reply = GetFabResponse()
    reply.ParseFromString(reply_body)
    fab = Fab(reply.fab.hash_str, reply.fab.content, dict(reply.fab.verifications))
    entities = yaml.safe_load(trusted_entities.read_text())
    return bool(fab.verifications.get("valid_license")) and _verify_fab(fab, entities)


def test_supernodes_accept_only_fabs_the_operator_signed(tmp_path):
    key, trusted = make_signing_key(tmp_path / "operator", "operator")
    other_key, _ = make_signing_key(tmp_path / "attacker", "operator")  # same name, another key
    signatures = tmp_path / "signatures"
    app, attacker_app = b"the operator's FAB", b"someone else's FAB"

    assert not supernode_accepts(sign_fab_reply(fab_reply(app), signatures), trusted)  # unsigned
    sign_fab(app, key, signatures)
    assert supernode_accepts(sign_fab_reply(fab_reply(app), signatures), trusted)
    assert not supernode_accepts(sign_fab_reply(fab_reply(app + b" changed"), signatures), trusted)
    sign_fab(attacker_app, other_key, signatures)
    assert not supernode_accepts(sign_fab_reply(fab_reply(attacker_app), signatures), trusted)


def test_fleet_front_serves_no_control_or_runtime_api(tmp_path):
    app = create_app("127.0.0.1:1", Path(certifi.where()), tmp_path)  # no SuperLink behind it
    with TestClient(app) as client:
        for path in (
            "/v1/control/list-nodes",
            "/v1/control/start-run",
            "/v1/control/register-node",
            "/v1/runtime/pull-messages",
            "/health",
            "/docs",
            "/v1/fleet/../control/list-nodes",
        ):
            assert client.post(path, content=b"").status_code == 404, path
        assert client.get("/v1/fleet/pull-messages").status_code == 404
        assert client.post("/v1/fleet/pull-messages", content=b"").status_code == 503  # forwarded: nobody there
