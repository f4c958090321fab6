"""``alignfl withdraw``: the operator's request reaches the run folder; bad input is one line and changes nothing."""

import json

import pytest

from alignfl_app.server.operator import OperatorRequests, main


def test_withdraw_records_the_silo_once_and_refuses_a_folder_without_a_run(tmp_path, capsys):
    run = tmp_path / "study-1"
    with pytest.raises(SystemExit):
        main([str(run), "lab-c"])  # no summary.json: not a run folder
    assert "holds no run" in capsys.readouterr().err and not (run / "operator").exists()
    run.mkdir()
    (run / "summary.json").write_text("{}")
    assert main([str(run), "lab-c", "--reason", "left the consortium"]) == 0
    assert main([str(run), "lab-c"]) == 0  # idempotent
    with pytest.raises(SystemExit):
        main([str(run), "../x"])  # a name, never a path
    saved = json.loads((run / "operator" / "withdrawn.json").read_text())
    assert [w["silo"] for w in saved["withdrawals"]] == ["lab-c"] and saved["withdrawals"][0]["reason"]
    assert OperatorRequests(run).withdrawn() == ["lab-c"]
    (run / "operator" / "withdrawn.json").write_text("{not json")
    assert OperatorRequests(run).withdrawn() == []  # unreadable: logged, nothing changes this round
