"""Folder datasets: conversion to the declared shape, one-line folder errors, the label space of class names,
architectures refused at config time, the export round trip and the saved model's own description."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from alignfl_app.config import ConfigError, parse_node_config, parse_run_config
from alignfl_app.data.datasets import federation_silo_data
from alignfl_app.data.folders import DataFolderError, load_image_folder


def write_image(path, size=(28, 28), mode="L", value=128, fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(path, format=fmt)


def make_folder(root, classes: dict[str, int], size=(28, 28), mode="L") -> None:
    for name, count in classes.items():
        for i in range(count):
            write_image(root / name / f"{i:03d}.png", size, mode, value=zlib.crc32(f"{root}/{name}/{i}".encode()))


def folder_config(dirs, classes: str, **extra) -> dict:
    return {"dataset": "folder", "silo-classes": classes, "silo-data-dirs": ";".join(map(str, dirs)), **extra}


def test_mixed_sizes_and_modes_become_the_declared_shape(tmp_path):
    write_image(tmp_path / "owl" / "a.png", (20, 30), "L")
    write_image(tmp_path / "owl" / "b.jpg", (64, 48), "RGB", fmt="JPEG")
    write_image(tmp_path / "cat" / "c.PNG", (32, 32), "RGBA")
    (tmp_path / "cat" / "notes.txt").write_text("not an image: ignored")
    for shape in [(3, 32, 32), (1, 16, 24)]:
        x, y = load_image_folder(tmp_path, ["owl", "cat"], shape)
        assert x.shape == (3, *shape) and x.dtype == torch.float32
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert y.tolist() == [0, 0, 1]  # classes in the given order, files sorted by name


@pytest.mark.parametrize(
    "breakage, needle",
    [
        ("empty class folder", "holds no PNG or JPEG image"),
        ("unreadable file", "cannot be read"),
        ("undeclared class folder", "not declared"),
        ("missing class folder", "no folder for declared class 'dog'"),
        ("no folder at all", "does not exist"),
    ],
)
def test_a_folder_that_cannot_serve_its_silo_stops_it_with_one_line_naming_the_folder(tmp_path, breakage, needle):
    root = tmp_path / "silo"
    make_folder(root, {"cat": 2, "dog": 2})
    if breakage == "empty class folder":
        for f in (root / "dog").iterdir():
            f.unlink()
    elif breakage == "unreadable file":
        (root / "dog" / "001.png").write_bytes(b"\x89PNG not really")
    elif breakage == "undeclared class folder":
        make_folder(root, {"emu": 1})
    elif breakage == "missing class folder":
        for f in (root / "dog").iterdir():
            f.unlink()
        (root / "dog").rmdir()
    else:
        root = tmp_path / "nowhere"
    cfg = parse_run_config(folder_config([root], "cat,dog"))
    with pytest.raises(DataFolderError, match=needle) as err:
        federation_silo_data(cfg, 0)
    assert "\n" not in str(err.value) and str(root) in str(err.value)


def test_the_label_space_is_the_sorted_union_of_declared_names_and_a_shared_class_pools(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_folder(a, {"zebra": 3, "cat": 3})
    make_folder(b, {"cat": 4, "ant": 2})
    cfg = parse_run_config(folder_config([a, b], "zebra,cat;cat,ant", **{"test-fraction": 0.0}))
    assert cfg.data.class_names == ("ant", "cat", "zebra")
    silos = [federation_silo_data(cfg, k) for k in range(2)]
    assert silos[0].classes == (2, 1) and silos[1].classes == (1, 0)
    assert torch.bincount(silos[0].y_train, minlength=3).tolist() == [0, 3, 3]
    assert torch.bincount(silos[1].y_train, minlength=3).tolist() == [2, 4, 0]
    # a node that declares its own classes must stay inside the run's label space
    assert cfg.data.class_ids(parse_node_config({"partition-id": 1, "classes": "ant"}).classes) == (0,)
    with pytest.raises(ConfigError, match="'emu' is not in the run's label space"):
        cfg.data.class_ids(("emu",))


def test_held_out_images_come_from_test_or_a_seeded_fraction(tmp_path):
    root = tmp_path / "silo"
    make_folder(root, {"cat": 10, "dog": 5})
    cfg = parse_run_config(folder_config([root], "cat,dog", **{"test-fraction": 0.2}))
    d = federation_silo_data(cfg, 0)
    assert (len(d.y_train), len(d.y_test)) == (12, 3)
    train, test = ({tuple(r.flatten()[:8].tolist()) for r in x} for x in (d.x_train, d.x_test))
    assert not train & test and torch.equal(federation_silo_data(cfg, 0).x_test, d.x_test)
    make_folder(root / "test", {"cat": 1, "dog": 2})
    d = federation_silo_data(cfg, 0)
    assert (len(d.y_train), torch.bincount(d.y_test).tolist()) == (15, [1, 2])


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"image-size": "28x28", "silo-architectures": "conv3"}, "needs image sides divisible by 8"),
        ({"image-size": "30x30", "silo-architectures": "mlp;conv"}, "needs image sides divisible by 4"),
        ({"image-size": "32"}, "HEIGHTxWIDTH"),
        ({"channels": 2}, "channels"),
    ],
)
def test_an_architecture_that_cannot_serve_the_image_size_is_refused_at_config_time(
    tmp_path, overrides, needle, monkeypatch
):
    conf = tmp_path / "conf" / "architectures"
    conf.mkdir(parents=True)
    from alignfl_app.resources import conf_dir

    for f in (conf_dir() / "architectures").glob("*.toml"):
        (conf / f.name).write_text(f.read_text())
    (conf / "conv3.toml").write_text('kind = "conv"\nlatent_dim = 8\nhidden = [8, 16, 32]\n')
    monkeypatch.setattr("alignfl_app.config.conf_dir", lambda: tmp_path / "conf")
    with pytest.raises(ConfigError, match=needle) as err:
        parse_run_config(overrides)
    assert "\n" not in str(err.value)
    assert parse_run_config({"image-size": "32x32", "channels": 3, "silo-architectures": "conv3;conv;mlp"})


def test_export_round_trip_loads_the_built_in_provider_s_tensors(tmp_path):
    from alignfl_app.data.datasets import global_test_set
    from alignfl_app.data.export import main as export

    out = tmp_path / "mnist"
    assert export(["--dataset", "mnist", "--out", str(out), "--silo-classes", "3,1;2", "--max-per-class", "25"]) == 0
    built_in = parse_run_config({"silo-classes": "3,1;2", "max-per-class": 25, "outliers-per-silo": 0})
    folder = parse_run_config(
        folder_config(
            [out / "silo-0", out / "silo-1"],
            "3,1;2",
            **{"max-per-class": 25, "global-test-dir": str(out / "global-test")},
        )
    )
    assert folder.data.class_names == ("1", "2", "3")
    for k in range(2):
        a, b = federation_silo_data(built_in, k), federation_silo_data(folder, k)
        names_a = [built_in.data.class_names[c] for c in a.y_train]
        names_b = [folder.data.class_names[c] for c in b.y_train]
        assert names_a == names_b and torch.equal(a.x_train, b.x_train)
        for c in a.classes:
            name = built_in.data.class_names[c]
            mine = folder.data.class_names.index(name)
            assert torch.equal(a.x_test[a.y_test == c], b.x_test[b.y_test == mine])
    (xa, ya), (xb, yb) = global_test_set(built_in), global_test_set(folder)
    assert torch.equal(xa[ya == 2], xb[yb == 1]) and len(yb) == int(torch.isin(ya, torch.tensor([1, 2, 3])).sum())
    assert export(["--dataset", "mnist", "--out", str(out)]) == 1  # never writes into an earlier export


def test_alignfl_run_sizes_a_folder_run_by_its_silo_groups():
    from alignfl_app.tools.local_superlink import configured_silos

    text = "dataset='folder' silo-data-dirs='a;b;c' silo-classes='tshirt,trouser;pullover,dress;coat,sandal,trouser'"
    assert configured_silos(text) == 3
    assert configured_silos(text + " image-size='30x30' silo-architectures='conv'") == 3  # refused later, still sized


def test_a_silo_whose_folder_is_unusable_replies_with_one_line_error(tmp_path):
    from flwr.app import ConfigRecord, MessageType, RecordDict

    from alignfl_app.config import silos_root
    from alignfl_app.contract import records as P
    from alignfl_app.silo.setup import provision_simulated_silos
    from client_app.app import train
    from tests.conftest import default_run_config, make_context, make_message

    (tmp_path / "empty").mkdir()
    run_config = {**default_run_config(), **folder_config([tmp_path / "empty"], "cat")}
    provision_simulated_silos(silos_root(), parse_run_config(run_config))  # as alignfl run sets the silo up
    msg = make_message(RecordDict({P.CONFIG: ConfigRecord({P.SERVER_ROUND: 1})}), MessageType.TRAIN, 0, 100)
    reply = train(msg, make_context(run_config, 0))
    assert reply.has_error() and reply.error.code == P.SILO_DATA_ERROR
    assert str(tmp_path / "empty") in reply.error.reason and "\n" not in reply.error.reason


def test_the_saved_global_model_carries_its_class_names_and_input_transform(tmp_path):
    from alignfl_app.models.global_model import GlobalModel, load_saved_model

    model = GlobalModel("classifier", 3, seed=1, image_shape=(3, 32, 32))
    torch.save(model.saved(("ant", "cat", "zebra")), tmp_path / "m.pt")
    again, about = load_saved_model(tmp_path / "m.pt")
    assert about["class-names"] == ["ant", "cat", "zebra"] and about["input"]["image-size"] == "32x32"
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(again.model.eval()(x), model.model.eval()(x))
    json.dumps({k: v for k, v in about.items() if k != "state-dict"})  # the description is plain data


@pytest.mark.parametrize("strategy", ["alignfl", "fedavg"])
def test_without_global_test_dir_each_silo_judges_the_global_model_on_its_own_images(tmp_path, strategy):
    from tests.conftest import tiny_run_config
    from tests.local_grid import run_server

    a, b = tmp_path / "a", tmp_path / "b"
    make_folder(a, {"cat": 8, "dog": 8})
    make_folder(b, {"dog": 8, "emu": 8})
    run_config = {
        **tiny_run_config(tmp_path / "results"),
        **folder_config([a, b], "cat,dog;dog,emu"),
        "strategy": strategy,
        "num-server-rounds": 1,
        "run-name": "silos",
    }
    run_server(run_config, num_silos=2)
    summary = json.loads((tmp_path / "results" / "silos" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["evaluation"]["by"] == "silos"
    assert "final-global-accuracy" not in summary and set(summary["final-per-silo-accuracy"]) == {"silo-0", "silo-1"}
    assert set(summary["rounds"][-1]["silos"]["silo-1"]["eval-accuracy-by-class"]) == {"dog", "emu"}
    assert 0.0 <= summary["final-silo-mean-accuracy"] <= 1.0
    assert (tmp_path / "results" / "silos" / "accuracy.png").is_file()


def test_a_private_folder_run_without_global_test_dir_says_it_is_not_evaluated(tmp_path):
    from alignfl_app.data.datasets import evaluation_plan

    cfg = parse_run_config(folder_config([tmp_path], "cat", **{"dp-epsilon": 2.0}))
    by, detail = evaluation_plan(cfg)
    assert by == "none" and "global-test-dir" in detail
    assert evaluation_plan(parse_run_config({**cfg.flat(), "global-test-dir": str(tmp_path)}))[0] == "global-test-dir"


def test_references_train_on_folder_silos_and_judge_on_their_pooled_held_out_images(tmp_path):
    from alignfl_app.reference import centralised, local_only

    a, b = tmp_path / "a", tmp_path / "b"
    make_folder(a, {"cat": 6, "dog": 6})
    make_folder(b, {"emu": 6})
    cfg = parse_run_config(
        folder_config([a, b], "cat,dog;emu", **{"reference-epochs": 1, "image-size": "16x16", "channels": 3})
    )
    for run in (local_only, centralised):
        summary = run(cfg, tmp_path / run.__name__)
        assert summary["evaluation"]["by"] == "pooled-silo-test-sets" and 0 <= summary["final-global-accuracy"] <= 1


def test_the_server_records_a_silo_whose_folder_is_unusable_and_goes_on_with_the_others(tmp_path):
    from tests.conftest import tiny_run_config
    from tests.local_grid import run_server

    a, b = tmp_path / "a", tmp_path / "b"
    make_folder(a, {"cat": 8, "dog": 8})
    make_folder(b, {"dog": 8, "emu": 8})
    (b / "emu" / "000.png").write_bytes(b"broken")
    run_config = {
        **tiny_run_config(tmp_path / "results"),
        **folder_config([a, b], "cat,dog;dog,emu"),
        "num-server-rounds": 1,
        "run-name": "broken",
    }
    run_server(run_config, num_silos=2)
    summary = json.loads((tmp_path / "results" / "broken" / "summary.json").read_text())
    rejected = summary["rounds"][0]["rejected-replies"]
    assert summary["status"] == "completed" and summary["rounds"][0]["generators-used"] == ["silo-0"]
    assert len(rejected) == 1 and str(b / "emu" / "000.png") in rejected[0] and "\n" not in rejected[0]


def test_a_deployed_silo_reads_the_data_dir_and_classes_of_its_node_config(tmp_path):
    from alignfl_app.silo.core import Silo

    make_folder(tmp_path / "mine", {"owl": 4})
    cfg = parse_run_config({"dataset": "folder", "silo-classes": "cat;owl", "test-fraction": 0.25})
    node = parse_node_config(
        {
            "partition-id": 0,
            "silo-name": "zoo",
            "classes": "owl",
            "data-dir": str(tmp_path / "mine"),
            "silo-dir": str(tmp_path / "zoo"),
        }
    )
    silo = Silo(cfg, node)
    assert silo.data.classes == (1,) and (len(silo.data.x_train), len(silo.data.x_test)) == (3, 1)
    with pytest.raises(DataFolderError, match="no data folder: set data-dir in its node config"):
        Silo(cfg, parse_node_config({"partition-id": 1, "silo-dir": str(tmp_path / "other")}))


def test_built_in_images_take_the_declared_shape_and_stay_untouched_at_the_default(tiny_config):
    default = parse_run_config(tiny_config)
    rgb = parse_run_config({**tiny_config, "image-size": "32x32", "channels": 3})
    a, b = federation_silo_data(default, 1), federation_silo_data(rgb, 1)
    assert a.x_train.shape[1:] == (1, 28, 28) and b.x_train.shape[1:] == (3, 32, 32)
    assert torch.equal(a.y_train, b.y_train) and torch.equal(b.x_train[:, 0], b.x_train[:, 2])
    from alignfl_app.data.datasets import load_split, to_image_shape

    x = load_split(default.data.resolved_data_root(), "mnist", False).images
    assert to_image_shape(x, (1, 28, 28)) is x
