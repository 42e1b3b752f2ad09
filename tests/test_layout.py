"""ditnorm/layout.py: where a run folder keeps its checkpoints, and which one a path names."""

from ditnorm import layout


def test_a_run_folder_and_the_checkpoint_a_path_names(tmp_path):
    run = tmp_path / "000-ToyDiT-1-none"
    for step in (10, 200):
        path = layout.checkpoint_path(run, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    shipped = layout.checkpoint_path(run, 300, layout.SHIPPED_SUFFIX)
    shipped.write_bytes(b"")
    assert layout.checkpoint_path(run, 10) == run / "checkpoints" / "0000010.pt"
    assert list(layout.run_checkpoints(run)) == [10, 200, 300]  # shipped weights are checkpoints too
    assert layout.checkpoint_at(run) == shipped and layout.checkpoint_at(run, 10).name == "0000010.pt"
    # What a run resumes from: the latest .pt of the folder (or of its checkpoints/), a file as given.
    assert layout.latest_checkpoint(run) == layout.latest_checkpoint(run / "checkpoints") == \
        layout.checkpoint_path(run, 200)
    assert layout.latest_checkpoint(shipped) == shipped and layout.latest_checkpoint(tmp_path / "no") is None
    (tmp_path / "empty").mkdir()
    assert layout.latest_checkpoint(tmp_path / "empty") is None
    assert layout.run_of(layout.checkpoint_path(run, 10)) == run and layout.run_of(tmp_path / "x.pt") is None
    assert layout.run_name(layout.checkpoint_path(run, 10)) == "000-ToyDiT-1-none-0000010"
    assert layout.run_name(tmp_path / "x.pt") == "x"
