"""reproduce.py and both notebooks, headless with papermill, on tiny runs and checkpoints; no network."""

import json
import shutil
from pathlib import Path

import nbformat
import papermill
import pytest
from builders import make_diffusers_transformers, make_latent_checkpoint, make_toy_runs, save_model

import reproduce
from models import build_model

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("TokenEmbeddingsViz.ipynb", "ToyDiT_visualization.ipynb")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_stored_stripped_with_one_parameters_cell(name):
    nb = nbformat.read(ROOT / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])  # first code cell: seed and device included
    # papermill reads every line of the cell as a parameter (a second '=' on a line hides it from papermill)
    names = [line.split("=")[0].strip() for line in code[0].source.splitlines() if line.strip()]
    assert list(papermill.inspect_notebook(str(ROOT / name))) == names
    assert {"seed", "device", "out_dir"} <= set(names)


def test_reproduce_tiny_trains_seeds_runs_both_notebooks_and_compares(tmp_path, monkeypatch):
    """The whole command at the tiny preset, then again against the first run's headline as reference."""
    latent = make_latent_checkpoint(tmp_path / "latent.pt")  # 1000 classes: the default class 207 exists
    first = tmp_path / "first"
    reproduce.main(["--preset", "tiny", "--seeds", "2", "--jobs", "1", "--results-dir", str(first),
                    "--pretrained", str(latent), "--num-sampling-steps", "5"])
    record = first / "res"
    for name in ("toydit_10.png", "toydit_20.png", "dit_token_embeddings_viz.png", "dit_block.png",
                 "toydit_token_embeddings_layernorm.png", "toydit_token_embeddings_none.png",
                 "seeds/study_errors.csv", "seeds/raw/study_errors.csv", "headline.md"):
        assert (record / name).stat().st_size > 0, name
    headline = json.loads((record / "headline.json").read_text())
    assert headline["step"] == 20 and len(headline["values"]["raw"]["layernorm max"]) == 2  # per seed
    results = (record / "results.md").read_text()
    assert results.count("| ToyDiT-XS/1 norm=") == 8  # seed 0: 2 norms x 2 steps x (EMA, raw)
    assert "zeros-layernorm-seed0" in results and "| EMA | median abs x |" in results
    assert "**DiT-S/2" in results and "CPU:" in results
    assert (first / "notebooks" / "TokenEmbeddingsViz.ipynb").is_file()

    # Again, with the first call's study tables and no notebooks (seconds): all inside the reference's ranges.
    def same_study(cmd):
        weights, dest = cmd[cmd.index("--weights") + 1], Path(cmd[cmd.index("--res-dir") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(record / "seeds" / ("raw" if weights == "raw" else "") / "study_errors.csv", dest)

    monkeypatch.setattr(reproduce, "run_command", same_study)
    monkeypatch.setattr(reproduce, "execute_notebook", lambda *a, **k: nbformat.v4.new_notebook())
    second = tmp_path / "second"
    (second / "runs").parent.mkdir()
    (second / "runs").symlink_to(first / "runs")
    out = tmp_path / "copy"
    reproduce.main(["--preset", "tiny", "--seeds", "2", "--jobs", "1", "--results-dir", str(second),
                    "--reference", str(record / "headline.json"), "--out-dir", str(out)])
    results = (out / "results.md").read_text()
    assert "8 of 8 new seed medians fall inside the committed seed ranges." in results
    assert (out / "headline.json").read_text() == (record / "headline.json").read_text()


def test_token_notebook_skips_unavailable_pretrained_model_and_probes_diffusers_models(tmp_path):
    runs = make_toy_runs(tmp_path / "results")
    folders = make_diffusers_transformers(tmp_path / "transformers")  # one kernel for both: ~7 s each
    out = tmp_path / "res"
    nb = reproduce.execute_notebook(ROOT / "TokenEmbeddingsViz.ipynb", dict(
        checkpoint=str(tmp_path / "missing.pt"), out_dir=str(out), results_dir=str(tmp_path / "results"),
        class_label=3, diffusers_models=[str(f) for f in folders.values()] + [str(tmp_path / "missing")],
        diffusers_timesteps=[100], diffusers_latent_size=4, plot_layers=2))
    text = reproduce.notebook_text(nb)
    assert "SKIPPED the pretrained model" in text and f"SKIPPED {tmp_path / 'missing'}" in text
    assert not (out / "dit_token_embeddings_viz.png").exists()
    assert (out / "toydit_token_embeddings_none.png").is_file()
    tables = (out / "token_outliers.md").read_text()
    assert f"norm=layernorm ({runs['layernorm'].name}/0000020.pt)" in tables  # the last shared step
    for family, streams in (("dit", ["image"]), ("pixart", ["image"]), ("sd3", ["text", "image"]),
                            ("flux", ["text", "image"])):
        for stream in streams:
            assert (out / f"diffusers_{family}_{stream}_token_embeddings.png").stat().st_size > 0
    assert tables.count("text embeddings: ZEROS stand-in (no text encoder run)") == 3  # PixArt, SD3, Flux
    assert "**dit (DiTTransformer2DModel): N(0,1) latents noised by DDPM's q_sample to t=100,500, class 3" \
        in tables
    assert "| image | single 1 |" in tables  # Flux's last single-stream block


def test_toy_notebook_refuses_runs_that_differ_in_more_than_the_norm(tmp_path):
    runs = make_toy_runs(tmp_path / "results")
    model = build_model("ToyDiT-XS/1", norm="none")
    save_model(model, "ToyDiT-XS/1", runs["none"] / "checkpoints" / "0000020.pt", train_args={"seed": 1})
    with pytest.raises(reproduce.ReproduceError) as e:
        reproduce.execute_notebook(ROOT / "ToyDiT_visualization.ipynb", dict(
            results_dir=str(tmp_path / "results"), out_dir=str(tmp_path / "res")))
    message = str(e.value)
    assert "ValueError" in message and "trained differently (seed None vs 1)" in message
    assert str(runs["layernorm"]) in message and str(runs["none"]) in message and "\n" not in message


def test_unknown_notebook_parameter_is_refused():
    with pytest.raises(reproduce.ReproduceError, match="has no parameter seeed"):
        reproduce.execute_notebook(ROOT / "ToyDiT_visualization.ipynb", dict(seeed=1))


def test_given_run_folders_are_evaluated_at_the_given_steps(tmp_path, monkeypatch):
    """--layernorm-run/--none-run: no training, those folders at --steps only."""
    given = make_toy_runs(tmp_path / "given", model_name="ToyDiT/1", steps=(10, 20, 30))
    executed = []
    monkeypatch.setattr(reproduce, "run_command", lambda cmd: pytest.fail(f"trained: {cmd}"))
    monkeypatch.setattr(reproduce, "execute_notebook", lambda path, params, out, progress:
                        executed.append(params) or nbformat.v4.new_notebook())
    reproduce.main(["--layernorm-run", str(given["layernorm"]), "--none-run", str(given["none"]),
                    "--steps", "20,10", "--results-dir", str(tmp_path / "results")])
    toy, token = executed
    assert toy["steps"] == [10, 20] and token["toy_step"] == 20
    assert toy["layernorm_run"] == str(given["layernorm"]) and token["none_run"] == str(given["none"])
    assert (tmp_path / "results" / "res" / "results.md").is_file()


@pytest.mark.parametrize("args, message", [
    (["--layernorm-run", "{ln}"], "--layernorm-run and --none-run go together"),
    (["--layernorm-run", "{ln}", "--none-run", "{none}", "--steps", "10k"], "give comma-separated integers"),
    (["--layernorm-run", "{ln}", "--none-run", "{none}", "--steps", "10,40"],
     "error: steps [10, 40] are not all saved by both runs; they share [10, 20]"),
    (["--layernorm-run", "{ln}", "--none-run", "{ln}/checkpoints"], "error: --none-run"),
    (["--layernorm-run", "{none}", "--none-run", "{ln}"], "error: --layernorm-run {none}: "),  # swapped
    (["--out-dir", "{res}/elsewhere"], "is inside the committed res/; add --refresh-res"),
    (["--preset", "gpu"], "needs a CUDA GPU"),
])
def test_bad_arguments_are_one_line_errors_that_write_nothing(tmp_path, args, message, capsys, monkeypatch):
    monkeypatch.setattr(reproduce.torch.cuda, "is_available", lambda: False)
    given = make_toy_runs(tmp_path / "given", model_name="ToyDiT/1")
    argv = [a.replace("{ln}", str(given["layernorm"])).replace("{none}", str(given["none"]))
            .replace("{res}", str(ROOT / "res")) for a in args]
    with pytest.raises(SystemExit) as e:
        reproduce.main([*argv, "--results-dir", str(tmp_path / "r")])
    text = str(e.value.code) if e.value.code != 2 else capsys.readouterr().err
    assert len(text.strip().splitlines()) == 1, text
    assert e.value.code != 0 and "error: " in text and message.replace("{none}", str(given["none"])) in text
    assert not (ROOT / "res" / "elsewhere").exists() and not (tmp_path / "r" / "res" / "results.md").exists()
