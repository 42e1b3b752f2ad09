"""ditnorm/hub.py: diffusers DiT folders into models.DiT and back, on tiny random models; no network."""

import json
import os

import pytest
import torch
from builders import make_diffusers_dit, make_latent_checkpoint, make_toy_runs, save_model

from ditnorm import hub
from ditnorm.checkpoint import CheckpointError, load_model
from models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(config, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = config["input_size"]
    x = torch.randn(batch, config["in_channels"], size, size, generator=g)
    y = torch.randint(0, config["num_classes"], (batch,), generator=g)
    return x, torch.tensor([0, 421, 999][:batch]), y


def export(path, out, **kwargs):
    """hub.export_diffusers of a checkpoint file, as export.py does it."""
    model, config = load_model(path)
    return hub.export_diffusers(model, out, name=config["model"], source=path, **kwargs)


def gap(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusers") / "dit"
    make_diffusers_dit(folder)
    return folder


@torch.no_grad()
def test_save_pretrained_folder_loads_and_matches_diffusers_with_shift_0(dit_folder):
    from diffusers import DiTTransformer2DModel

    ours, config = load_model(dit_folder)
    assert config == dict(model="DiTTransformer2DModel", input_size=4, patch_size=2, in_channels=4,
                          hidden_size=32, depth=2, num_heads=2, mlp_ratio=4.0, class_dropout_prob=0.1,
                          num_classes=10, learn_sigma=True, norm="layernorm", dropout=0.0, cap=0.0)
    theirs = DiTTransformer2DModel.from_pretrained(dit_folder).eval()
    x, t, y = inputs(config)
    as_saved = theirs(x, t, y).sample
    for block in theirs.transformer_blocks:  # diffusers' Timesteps(downscale_freq_shift=1) -> DiT's 0
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    torch.testing.assert_close(ours(x, t, y), theirs(x, t, y).sample, rtol=1e-5, atol=1e-5)
    assert gap(as_saved, ours(x, t, y)) > 1e-3  # the frequency difference is real


def test_official_function_fixes_a_default_eps_folder(tmp_path):
    make_diffusers_dit(tmp_path / "eps", norm_eps=1e-5)  # diffusers' default, as in its DiT conversion
    gaps = hub.compare_with_diffusers(tmp_path / "eps", load_model(tmp_path / "eps")[0])
    assert gaps["norm_eps"] == 1e-5 and gaps["as_saved"] > 1e-3 and gaps["official"] < 1e-5


def test_embedder_copies_that_disagree_are_refused(tmp_path):
    model = make_diffusers_dit(num_layers=3)
    with torch.no_grad():
        model.transformer_blocks[2].norm1.emb.timestep_embedder.linear_2.bias.add_(1e-3)
    model.save_pretrained(tmp_path / "bad")
    with pytest.raises(CheckpointError, match="block 2's copy of norm1.emb.timestep_embedder.linear_2.bias"):
        load_model(tmp_path / "bad")


def test_foreign_and_broken_folders_are_one_line_errors(tmp_path, dit_folder):
    from diffusers import PixArtTransformer2DModel

    PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=4,
                             cross_attention_dim=16, caption_channels=8).save_pretrained(tmp_path / "pixart")
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "config.json").write_text("{not json")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text((dit_folder / "config.json").read_text())
    gelu = json.loads((dit_folder / "config.json").read_text()) | {"activation_fn": "gelu"}
    (tmp_path / "gelu").mkdir()
    (tmp_path / "gelu" / "config.json").write_text(json.dumps(gelu))
    os.symlink(dit_folder / hub.WEIGHTS, tmp_path / "gelu" / hub.WEIGHTS)
    cases = {"pixart": "holds a PixArtTransformer2DModel, not a DiTTransformer2DModel",
             "empty": "a folder without a diffusers config.json", "garbled": "cannot read",
             "no_weights": "has no diffusion_pytorch_model.safetensors",
             "gelu": "activation_fn='gelu' where DiT has 'gelu-approximate'"}
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as e:
            load_model(tmp_path / name)
        assert "\n" not in str(e.value)
    why = r"\(a diffusers DiT: layernorm by definition\)"
    with pytest.raises(CheckpointError, match=f"norm=layernorm model {why}, not norm=none"):
        load_model(dit_folder, norm="none")


@pytest.mark.parametrize("kind", ["toy", "latent"])
def test_export_round_trips_and_diffusers_computes_it(tmp_path, kind):
    from diffusers import DiTTransformer2DModel

    if kind == "toy":  # one class, no class dropout: diffusers' extra null row is added, then dropped
        path = make_toy_runs(tmp_path / "runs", steps=(10,))["layernorm"] / "checkpoints" / "0000010.pt"
    else:
        path = make_latent_checkpoint(tmp_path / "latent.pt", num_classes=10)
    out = export(path, tmp_path / "exported")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left beside
    original, config = load_model(path)
    loaded, loaded_config = load_model(out)
    assert loaded_config == config
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in original.state_dict().items())
    theirs = hub.use_official_dit_function(DiTTransformer2DModel.from_pretrained(out).eval())
    x, t, y = inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t, y).sample, original(x, t, y), rtol=1e-5, atol=1e-5)


def test_export_refuses_what_diffusers_cannot_compute_and_leaves_nothing(tmp_path, monkeypatch):
    runs = make_toy_runs(tmp_path / "runs", steps=(10,))
    with pytest.raises(CheckpointError, match="norm=none model; diffusers' DiTTransformer2DModel is a"):
        export(runs["none"] / "checkpoints" / "0000010.pt", tmp_path / "out")
    wide = build_model("ToyDiT-XS/1", mlp_ratio=2.0)
    with pytest.raises(CheckpointError, match="mlp_ratio 2.0"):
        hub.export_diffusers(wide, tmp_path / "out")
    layernorm = runs["layernorm"] / "checkpoints" / "0000010.pt"
    export(layernorm, tmp_path / "out")
    with pytest.raises(CheckpointError, match="exists; pass a new folder or overwrite it"):
        export(layernorm, tmp_path / "out")

    from diffusers import DiTTransformer2DModel

    def broken_save(self, folder, **kwargs):
        (folder / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(DiTTransformer2DModel, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export(layernorm, tmp_path / "out", overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        export(layernorm, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "runs"]  # no temporary folder left
    load_model(tmp_path / "out")  # the old export is intact


def test_model_export_keeps_registry_name(tmp_path):
    model = build_model("ToyDiT-XS/1", num_classes=3, class_dropout_prob=0.1)
    save_model(model, "ToyDiT-XS/1", tmp_path / "ckpt.pt")
    out = hub.export_diffusers(model, tmp_path / "exported")
    assert load_model(out)[1]["model"] == "ToyDiT-XS/1"
    (out / hub.STUDY_CONFIG).write_text("{")
    with pytest.raises(CheckpointError, match="delete it to load the folder as a plain diffusers DiT"):
        load_model(out)
    (out / hub.STUDY_CONFIG).unlink()  # a plain diffusers folder: named from the registry
    assert load_model(out)[1] == load_model(tmp_path / "ckpt.pt")[1]


def test_hub_ids_resolve_through_snapshot_download(tmp_path, monkeypatch, dit_folder):
    calls = []
    pipeline = tmp_path / "snapshot"
    (pipeline / "transformer").mkdir(parents=True)
    (pipeline / "model_index.json").write_text("{}")
    for f in dit_folder.iterdir():
        os.symlink(f, pipeline / "transformer" / f.name)

    def fake_snapshot(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        if repo_id != "org/dit":
            raise OSError("404 Client Error: Repository Not Found")
        return str(pipeline)

    monkeypatch.setattr(hub, "_snapshot_download", fake_snapshot)
    monkeypatch.chdir(tmp_path)
    model, config = load_model("org/dit")
    assert config["depth"] == 2 and calls[0][0] == "org/dit"
    assert "transformer/diffusion_pytorch_model.safetensors" in calls[0][1]
    assert not any("vae" in p or "text_encoder" in p for p in calls[0][1])  # the transformer only
    with pytest.raises(CheckpointError, match="org/missing is not a local path and its download .* failed"):
        load_model("org/missing")
    with pytest.raises(CheckpointError, match="allow the download"):
        load_model("org/dit", download=False)
    with pytest.raises(CheckpointError, match="not found; pass a path to a checkpoint"):
        load_model("results/0005000.pt")  # a missing file is no hub id
    assert len(calls) == 2
