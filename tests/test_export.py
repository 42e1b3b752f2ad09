"""export.py: the command line of ditnorm/hub.py (export a checkpoint to diffusers, compare the forwards)."""

import pytest
from builders import make_toy_runs

import export

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_export_and_compare(tmp_path, capsys):
    path = make_toy_runs(tmp_path / "runs", steps=(10,))["layernorm"] / "checkpoints" / "0000010.pt"
    export.main(["diffusers", str(path), str(tmp_path / "out")])
    assert "wrote" in capsys.readouterr().out and (tmp_path / "out" / "config.json").is_file()
    export.main(["compare", str(tmp_path / "out"), "--batch-size", "2"])
    printed = capsys.readouterr().out
    assert "timestep shift 0 0.00e+00" in printed and "as saved" in printed
    for argv, says in ((["diffusers", str(path), str(tmp_path / "out")], "exists; pass a new folder"),
                       (["compare", str(path)], "is not a diffusers folder or hub id")):
        with pytest.raises(SystemExit) as e:
            export.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("export.py: error: ") and err.count("\n") == 1, err
        assert says in err
    with pytest.raises(SystemExit):
        export.main(["--help"])
    assert "python export.py compare" in capsys.readouterr().out
