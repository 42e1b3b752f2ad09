"""Both notebooks run headless on tiny checkpoints, through reproduce.py's executor; no network."""

from pathlib import Path

import nbformat
import pytest
from builders import make_diffusers_transformers, make_latent_checkpoint, make_toy_runs, save_model

import reproduce
from models import build_model

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("TokenEmbeddingsViz.ipynb", "ToyDiT_visualization.ipynb")


def test_inject_parameters_replaces_values_and_rejects_unknown_names():
    source = 'seed = 0\ncheckpoint = "a.pt"  # a comment\nsteps = [1, 2]'
    new = reproduce.inject_parameters(source, {"checkpoint": Path("b.pt"), "steps": [3]})
    assert new == "seed = 0\ncheckpoint = 'b.pt'  # a comment\nsteps = [3]"
    with pytest.raises(ValueError, match="seeed"):
        reproduce.inject_parameters(source, {"seeed": 1})


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_stored_stripped_with_one_parameters_cell(name):
    nb = nbformat.read(ROOT / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])  # first code cell: seed and device included
    assert "seed = " in code[0].source and "device = " in code[0].source


def test_reproduce_skip_train_runs_both_notebooks(tmp_path):
    make_toy_runs(tmp_path / "results", model_name="ToyDiT/1", steps=(10, 2000))
    latent = make_latent_checkpoint(tmp_path / "latent.pt")  # 1000 classes: the default class 207 exists
    out = tmp_path / "res"
    reproduce.main(["--skip-train", "--results-dir", str(tmp_path / "results"), "--out-dir", str(out),
                    "--pretrained", str(latent), "--num-sampling-steps", "5"])
    for name in ("toydit_10.png", "toydit_2k.png", "dit_token_embeddings_viz.png",
                 "toydit_token_embeddings_layernorm.png", "toydit_token_embeddings_none.png"):
        assert (out / name).stat().st_size > 0, name
    results = (out / "results.md").read_text()
    assert results.count("| ToyDiT/1 norm=") == 8  # 2 norms x 2 steps x (EMA, raw) in the error table
    layer0_rows = [line for line in results.splitlines() if line.startswith("| 0 |")]
    assert "**DiT-S/2" in results and len(layer0_rows) == 3  # outlier tables: pretrained + 2 toys
    assert "CPU:" in results and "notebook ToyDiT_visualization.ipynb" in results
    assert "CPU preset" not in results  # nothing trained here: the runs' schedule is not known
    assert (tmp_path / "results" / "notebooks" / "TokenEmbeddingsViz.ipynb").is_file()


def test_token_notebook_skips_unavailable_pretrained_model_and_probes_diffusers_models(tmp_path):
    runs = make_toy_runs(tmp_path / "results")
    folders = make_diffusers_transformers(tmp_path / "transformers")  # one kernel for both: ~7 s each
    out = tmp_path / "res"
    nb = reproduce.execute_notebook(ROOT / "TokenEmbeddingsViz.ipynb", dict(
        checkpoint=str(tmp_path / "missing.pt"), out_dir=str(out),
        toy_layernorm=str(runs["layernorm"] / "checkpoints" / "0000010.pt"),
        toy_none=str(runs["none"] / "checkpoints" / "0000020.pt"), class_label=3,
        diffusers_models=[str(f) for f in folders.values()] + [str(tmp_path / "missing")],
        diffusers_timesteps=[100], diffusers_latent_size=4, plot_layers=2))
    text = reproduce.notebook_text(nb)
    assert "SKIPPED the pretrained model" in text and f"SKIPPED {tmp_path / 'missing'}" in text
    assert not (out / "dit_token_embeddings_viz.png").exists()
    assert (out / "toydit_token_embeddings_none.png").is_file()
    tables = (out / "token_outliers.md").read_text()
    assert "ToyDiT-XS/1 norm=layernorm" in tables
    for family, streams in (("dit", ["image"]), ("pixart", ["image"]), ("sd3", ["text", "image"]),
                            ("flux", ["text", "image"])):
        for stream in streams:
            assert (out / f"diffusers_{family}_{stream}_token_embeddings.png").stat().st_size > 0
    assert tables.count("text embeddings: ZEROS stand-in (no text encoder run)") == 3  # PixArt, SD3, Flux
    assert "**dit (DiTTransformer2DModel): N(0,1) latents noised by DDPM's q_sample to t=100,500, class 3" \
        in tables
    assert "| image | single 1 |" in tables  # Flux's last single-stream block


def test_skip_train_without_runs_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--skip-train", "--results-dir", str(tmp_path), "--out-dir", str(tmp_path / "res")])
    assert str(e.value.code).startswith("error: no ToyDiT/1 run for norm=layernorm")


def test_training_stage_uses_cpu_preset_and_the_run_it_created(tmp_path, monkeypatch):
    results = tmp_path / "results"
    make_toy_runs(results, model_name="ToyDiT/1", steps=(10,))  # an older run that must not be picked
    commands, executed = [], []

    def fake_train(cmd):
        commands.append(cmd)
        norm = cmd[cmd.index("--norm") + 1]
        model = build_model("ToyDiT/1", norm=norm)
        save_model(model, "ToyDiT/1", results / f"00{len(commands)}-ToyDiT-1-{norm}/checkpoints/0000400.pt")

    monkeypatch.setattr(reproduce, "run_command", fake_train)
    monkeypatch.setattr(reproduce.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(reproduce, "execute_notebook",
                        lambda path, params, out: executed.append(params) or nbformat.v4.new_notebook())
    reproduce.main(["--results-dir", str(results), "--out-dir", str(tmp_path / "res")])
    assert [c[c.index("--norm") + 1] for c in commands] == ["layernorm", "none"]
    assert all(c[-2:] == ["--preset", "cpu"] and "torch.distributed.run" not in c for c in commands)
    assert executed[0]["steps"] == [400] and executed[0]["none_run"].endswith("002-ToyDiT-1-none")
    results = (tmp_path / "res/results.md").read_text()
    assert "| train norm=none | `python train_toy.py --norm none" in results
    assert "- GPU: none (CPU preset)" in results  # it trained with the CPU preset


def test_given_run_folders_are_evaluated_at_the_given_steps(tmp_path, monkeypatch):
    """--layernorm-run/--none-run: no training, those folders (not the newest ones) at --steps only."""
    given = make_toy_runs(tmp_path / "given", model_name="ToyDiT/1", steps=(10, 20, 30))
    make_toy_runs(tmp_path / "results", model_name="ToyDiT/1", steps=(10, 20, 30))  # must not be picked
    executed = []
    monkeypatch.setattr(reproduce, "run_command", lambda cmd: pytest.fail(f"trained: {cmd}"))
    monkeypatch.setattr(reproduce, "execute_notebook",
                        lambda path, params, out: executed.append(params) or nbformat.v4.new_notebook())
    reproduce.main(["--layernorm-run", str(given["layernorm"]), "--none-run", str(given["none"]),
                    "--steps", "20,10", "--results-dir", str(tmp_path / "results"),
                    "--out-dir", str(tmp_path / "res")])
    toy = executed[0]
    assert toy["steps"] == [10, 20]
    assert toy["layernorm_run"] == str(given["layernorm"]) and toy["none_run"] == str(given["none"])
    assert executed[1]["toy_none"] == str(given["none"] / "checkpoints" / "0000020.pt")  # the last of --steps


@pytest.mark.parametrize("args, message", [
    (["--layernorm-run", "{ln}"], "--layernorm-run and --none-run go together"),
    (["--layernorm-run", "{ln}", "--none-run", "{none}", "--steps", "10k"], "give comma-separated integers"),
    (["--layernorm-run", "{ln}", "--none-run", "{none}", "--steps", "10,40"],
     "error: --steps 10,40: not saved by both runs; they share [10, 20]"),
    (["--layernorm-run", "{ln}", "--none-run", "{ln}/checkpoints"], "error: --none-run"),
    (["--layernorm-run", "{none}", "--none-run", "{ln}"], "error: --layernorm-run {none}: "),  # swapped
])
def test_bad_given_runs_are_one_line_errors(tmp_path, args, message):
    given = make_toy_runs(tmp_path / "given", model_name="ToyDiT/1")
    argv = [a.replace("{ln}", str(given["layernorm"])).replace("{none}", str(given["none"])) for a in args]
    with pytest.raises(SystemExit) as e:
        reproduce.main([*argv, "--results-dir", str(tmp_path / "r"), "--out-dir", str(tmp_path / "res")])
    message = message.replace("{none}", str(given["none"]))
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code)
    assert "\n" not in str(e.value.code)

