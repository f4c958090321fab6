"""Deployment with the silos' own image folders: TLS, authenticated SuperNodes, each reading its own ``data-dir``.

Nothing is shared between the coordinator and the silos but the CA certificate, the silos' public keys and the
operator's trusted-entities file (SuperNodes run only the app the operator signed): the
run config names the classes (names, not ids) and the image shape, each SuperNode's node config names its own
folder, and the server judges the global model on its own ``global-test-dir``.
"""

import json

import pytest

from tests.deployment_harness import deployment_federation
from tests.folder_data import SILO_CLASSES, tinted_federation

pytestmark = pytest.mark.e2e


def test_deployed_silos_train_on_their_own_folders(tmp_path):
    keys = tinted_federation(tmp_path / "data", per_class=150)
    folders = keys["silo-data-dirs"].split(";")
    results = tmp_path / "results"
    run_config = (
        f"dataset='folder' silo-classes='{keys['silo-classes']}' image-size='32x32' channels=3 "
        f"global-test-dir='{keys['global-test-dir']}' results-dir='{results}' run-name='deployed-folders' "
        "num-server-rounds=2 local-epochs=8 batch-size=32 synthetic-per-silo=500 server-epochs=4 "
        "silo-architectures='mlp-small;conv' sample-grid-per-silo=2 round-timeout=300"
    )
    names = ["site-a", "site-b", "site-c"]
    run_config += f" silo-names='{';'.join(names)}'"
    with deployment_federation(tmp_path / "fed") as fed:
        node_ids = {}
        for k, (silo, folder) in enumerate(zip(names, folders, strict=True)):
            key = fed.make_key(silo)
            node_ids[silo] = fed.register(key)
            fed.start_supernode(silo, f'partition-id={k} silo-name="{silo}" data-dir="{folder}"', key)
        fed.wait_online(3)
        run_config += " silo-nodes='" + ",".join(f"{s}={n}" for s, n in node_ids.items()) + "'"
        fed.sign_app()
        run, log = fed.run_app(run_config, num_supernodes=None, timeout=600)
        assert run["status"] == "finished:completed", log[-4000:] + fed.log.read_text()[-3000:]

    summary = json.loads((results / "deployed-folders" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["evaluation"]["by"] == "global-test-dir"
    last = summary["rounds"][-1]
    assert last["generators-used"] == names and last["rejected-replies"] == []
    assert [last["silos"][s]["classes"] for s in names] == [list(c) for c in SILO_CLASSES]
    # five garment classes (chance 0.2); the classifier learned only from the three sites' decoders
    assert summary["final-global-accuracy"] > 0.4, summary["final-global-accuracy"]
    assert (results / "deployed-folders" / "samples" / "round-002.png").is_file()
