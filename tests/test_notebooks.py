"""Both notebooks, headless with papermill, on tiny runs and checkpoints; no network."""

from pathlib import Path

import nbformat
import papermill
import pytest
from builders import make_diffusers_transformers, make_latent_checkpoint, make_toy_runs, save_model

from ditnorm import notebooks
from models import build_model

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("TokenEmbeddingsViz.ipynb", "ToyDiT_visualization.ipynb")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_stored_stripped_with_one_parameters_cell(name):
    nb = nbformat.read(ROOT / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    ids = [c.get("id") for c in nb.cells]  # nbformat 4.5 needs one per cell (a missing one only warns today)
    assert None not in ids and len(set(ids)) == len(ids)
    assert "parameters" in code[0].metadata.get("tags", [])  # first code cell: seed and device included
    # papermill reads every line of the cell as a parameter (a second '=' on a line hides it from papermill)
    names = [line.split("=")[0].strip() for line in code[0].source.splitlines() if line.strip()]
    assert list(papermill.inspect_notebook(str(ROOT / name))) == names
    assert {"seed", "device", "out_dir"} <= set(names)


def test_both_notebooks_run_on_two_runs_into_one_folder(tmp_path):
    """What the reproduce preset's report runs, on tiny run folders and a tiny latent DiT as pretrained."""
    latent = make_latent_checkpoint(tmp_path / "latent.pt")  # 1000 classes: the default class 207 exists
    runs = make_toy_runs(tmp_path / "results")
    out = tmp_path / "res"
    skipped = notebooks.run_both(runs, out, tmp_path / "executed", pretrained=str(latent),
                                 num_sampling_steps=5)
    assert skipped == []
    for name in ("toydit_10.png", "toydit_20.png", "dit_token_embeddings_viz.png", "toydit_errors.md",
                 "toydit_token_embeddings_layernorm.png", "toydit_token_embeddings_none.png",
                 "token_outliers.md"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "toydit_errors.md").read_text().count("| ToyDiT-XS/1 norm=") == 8  # 2 norms x 2 steps x 2
    assert (tmp_path / "executed" / "TokenEmbeddingsViz.ipynb").is_file()


def test_given_steps_reach_both_notebooks(tmp_path, monkeypatch):
    given = make_toy_runs(tmp_path / "given", steps=(10, 20, 30))
    executed = []
    monkeypatch.setattr(notebooks, "execute_notebook", lambda path, params, out: executed.append(params)
                        or nbformat.v4.new_notebook())
    notebooks.run_both(given, tmp_path / "res", tmp_path / "executed", steps=[20, 10])
    toy, token = executed
    assert toy["steps"] == [10, 20] and token["toy_step"] == 20
    assert toy["layernorm_run"] == str(given["layernorm"]) and token["none_run"] == str(given["none"])
    with pytest.raises(ValueError, match=r"steps \[10, 40\] are not all saved by both runs"):
        notebooks.run_both(given, tmp_path / "res", tmp_path / "executed", steps=[10, 40])
    assert notebooks.run_both({"layernorm": given["layernorm"]}, tmp_path, tmp_path)[0].startswith("SKIPPED")


def tiny_mnist_pair(folder):
    """MnistDiT-XS/4 runs of layernorm and none, 2 steps each, under folder (the mnist preset's names)."""
    from ditnorm.trainer import IMAGE_DEFAULTS, train_run

    for norm in ("layernorm", "none"):
        cfg = {**IMAGE_DEFAULTS, "model": "MnistDiT-XS/4", "norm": norm, "max_steps": 2, "ckpt_every": 2,
               "log_every": 2, "global_batch_size": 4}
        train_run(cfg, folder / f"MnistDiT-XS-4-{norm}-seed0")


def test_token_notebook_skips_unavailable_pretrained_model_and_probes_diffusers_models(tmp_path):
    runs = make_toy_runs(tmp_path / "results")
    tiny_mnist_pair(tmp_path / "mnist")
    folders = make_diffusers_transformers(tmp_path / "transformers")  # one kernel for both: ~7 s each
    out = tmp_path / "res"
    nb = notebooks.execute_notebook(ROOT / "TokenEmbeddingsViz.ipynb", dict(
        checkpoint=str(tmp_path / "missing.pt"), out_dir=str(out), results_dir=str(tmp_path / "results"),
        class_label=3, diffusers_models=[str(f) for f in folders.values()] + [str(tmp_path / "missing")],
        diffusers_timesteps=[100], diffusers_latent_size=4, plot_layers=2, mnist_dir=str(tmp_path / "mnist"),
        mnist_images=3))
    text = notebooks.notebook_text(nb)
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
    # The MNIST pair, side by side: one figure, a table per norm
    assert (out / "mnist_token_embeddings.png").stat().st_size > 0
    assert tables.count("**MnistDiT-XS/4, ema weights, held-out digits noised to t=500:") == 2


def test_toy_notebook_refuses_runs_that_differ_in_more_than_the_norm(tmp_path):
    runs = make_toy_runs(tmp_path / "results")
    model = build_model("ToyDiT-XS/1", norm="none")
    save_model(model, "ToyDiT-XS/1", runs["none"] / "checkpoints" / "0000020.pt", train_args={"seed": 1})
    with pytest.raises(notebooks.NotebookError) as e:
        notebooks.execute_notebook(ROOT / "ToyDiT_visualization.ipynb", dict(
            results_dir=str(tmp_path / "results"), out_dir=str(tmp_path / "res")))
    message = str(e.value)
    assert "ValueError" in message and "trained differently (seed None vs 1)" in message
    assert str(runs["layernorm"]) in message and str(runs["none"]) in message and "\n" not in message


def test_unknown_notebook_parameter_is_refused():
    with pytest.raises(notebooks.NotebookError, match="has no parameter seeed"):
        notebooks.execute_notebook(ROOT / "ToyDiT_visualization.ipynb", dict(seeed=1))


def test_a_report_says_which_notebook_it_runs_before_it_runs(tmp_path, monkeypatch, capsys):
    said = []
    def execute(*args, **kwargs):  # what was printed before the notebook started
        said.append(capsys.readouterr().out)
        return nbformat.v4.new_notebook()

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    notebooks.execute_notebook(ROOT / "ToyDiT_visualization.ipynb", dict(seed=1), tmp_path / "out.ipynb")
    assert said == [f"running notebook ToyDiT_visualization.ipynb -> {tmp_path / 'out.ipynb'}\n"]


def table_rows(text):
    """The rows of every markdown table in text (the statistics, without the titles that name files)."""
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| model")
            and not line.startswith("| layer")]


def test_a_fresh_clone_shows_the_committed_figures_from_the_shipped_weights(tmp_path):
    """No results/ anywhere: both notebooks fall back on res/*/weights/ and give the committed statistics
    (the toy's at 5k only, half the sampling; the committed table holds 1k too)."""
    empty, out = tmp_path / "results", tmp_path / "figures"
    empty.mkdir()
    toy = notebooks.execute_notebook(ROOT / "ToyDiT_visualization.ipynb", dict(
        results_dir=str(empty), out_dir=str(out), steps=[5000]))
    token = notebooks.execute_notebook(ROOT / "TokenEmbeddingsViz.ipynb", dict(
        results_dir=str(empty), mnist_dir=str(empty), checkpoint="", out_dir=str(out)))
    for nb in (toy, token):
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"]
        assert any("image/png" in o.get("data", {}) for o in outputs), "no figure shown"
    assert "runs res/reproduce/weights/zeros-layernorm-seed0 and res/reproduce/weights/zeros-none-seed0" \
        in notebooks.notebook_text(toy)
    committed = ROOT / "res" / "reproduce"
    rows = table_rows((out / "toydit_errors.md").read_text())
    assert len(rows) == 4 and rows == [r for r in table_rows((committed / "toydit_errors.md").read_text())
                                       if "| 5000 |" in r]
    tables = (out / "token_outliers.md").read_text()
    assert tables.count("**ToyDiT/1 norm=") == 2
    mnist_part, toy_part = tables.split("**ToyDiT/1", 1)
    assert table_rows(toy_part) == table_rows((committed / "token_outliers.md").read_text())
    mnist = ROOT / "res" / "mnist"
    if (mnist / "weights").is_dir():  # the shipped MNIST pair made res/mnist's figure and tables
        assert mnist_part.count("**MnistDiT-") == 2 and (out / "mnist_token_embeddings.png").is_file()
        assert table_rows(mnist_part) == table_rows((mnist / "token_outliers.md").read_text())
    else:
        assert "SKIPPED the MNIST models" in notebooks.notebook_text(token)
    for name in ("toydit_5k.png", "toydit_token_embeddings_layernorm.png",
                 "toydit_token_embeddings_none.png"):
        assert (out / name).stat().st_size > 0
