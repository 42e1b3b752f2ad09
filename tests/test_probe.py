"""ditnorm/probe.py and probe.py: the residual-stream probe on tiny random DiT, PixArt, SD3 and Flux
transformers; no network."""

import pytest
import torch
from builders import make_diffusers_transformers

import probe as probe_cli
from ditnorm import analysis, probe
from ditnorm.checkpoint import CheckpointError, load_model

pytestmark = pytest.mark.usefixtures("one_thread")

# streams and block labels each family's probe must report (tiny models: 2 blocks; Flux 1 double, 2 single)
EXPECTED = {
    "dit": {"image": ["0", "1"]},
    "pixart": {"image": ["0", "1"]},
    "sd3": {"text": ["0"], "image": ["0", "1"]},  # SD3's last block returns no text stream
    "flux": {"text": ["double 0", "single 0", "single 1"], "image": ["double 0", "single 0", "single 1"]},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_diffusers_transformers(tmp_path_factory.mktemp("transformers"))


@pytest.mark.parametrize("family", list(EXPECTED))
def test_probe_captures_every_block_of_every_stream(folders, family):
    model = probe.load_transformer(folders[family])
    runs, described = probe.probe(model, [100, 900], class_label=3, text_length=5, latent_size=4)
    assert len(runs) == 2 and "t=100,900" in described
    assert ("ZEROS stand-in" in described) == (family != "dit")
    assert {s: [label for label, _ in layers] for s, layers in runs[0].items()} == EXPECTED[family]
    for stream, layers in runs[0].items():
        tokens = 5 if stream == "text" else 4  # 4x4 latents in 2x2 patches
        assert all(h.shape == (1, tokens, 32) for _, h in layers)
    assert not torch.equal(runs[0]["image"][-1][1], runs[1]["image"][-1][1])  # the timestep matters
    rows = probe.probe_stats(runs)
    assert len(rows) == sum(len(v) for v in EXPECTED[family].values())
    table = probe.format_probe_table(rows, title=family)
    assert table.count("\n| image |") == len(EXPECTED[family]["image"])
    summary = probe.format_summary(family, rows, described)
    assert len(summary.splitlines()) == len(EXPECTED[family])
    assert summary.count("|") == probe.SUMMARY_HEADER.splitlines()[0].count("|") * len(EXPECTED[family])
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_last_image_stream_is_what_the_output_norm_reads(folders, family):
    model = probe.load_transformer(folders[family])
    inputs, _ = probe.probe_inputs(model, 500, text_length=5, latent_size=4, text="random")
    seen = []
    handle = model.norm_out.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    streams = probe.capture_streams(model, inputs)
    handle.remove()
    torch.testing.assert_close(streams["image"][-1][1], seen[0])


def test_diffusers_dit_probe_is_the_official_dit_residual_stream(folders):
    model = probe.load_transformer(folders["dit"])
    assert all(b.norm1.emb.time_proj.downscale_freq_shift == 0 for b in model.transformer_blocks)
    inputs, _ = probe.probe_inputs(model, 700, class_label=4)
    streams = probe.capture_streams(model, inputs)
    ours, _ = load_model(folders["dit"])
    expected = analysis.capture_block_outputs(ours, inputs["hidden_states"], inputs["timestep"],
                                              inputs["class_labels"])
    for (_, h), e in zip(streams["image"], expected, strict=True):
        torch.testing.assert_close(h, e, rtol=1e-5, atol=1e-5)


def test_layer_stats_finds_a_recurring_channel():
    g = torch.Generator().manual_seed(0)
    per_timestep = [0.1 * torch.randn(2, 8, 16, generator=g) for _ in range(3)]  # (N, T, D) per timestep
    for i, h in enumerate(per_timestep):
        h[:, :, 5] = -40.0 - i  # every token, every timestep: channel 5
    per_timestep[1][0, 3, 9] = 30.0
    row = probe.layer_stats(per_timestep)
    assert row["top1"] == pytest.approx(42.0) and row["top1_value"] == pytest.approx(-42.0)
    assert row["channels"][:2] == [5, 9] and row["token_share"] == 1.0
    assert row["timestep_channels"] == [5, 5, 5]
    assert row["ratio"] == pytest.approx(42.0 / row["median"]) and not row["massive"]


def test_bad_requests_are_one_line_errors(folders, tmp_path):
    dit = probe.load_transformer(folders["dit"])
    with pytest.raises(ValueError, match="class 10 out of range"):
        probe.probe_inputs(dit, 10, class_label=10)
    with pytest.raises(ValueError, match="outside 0..999"):
        probe.probe_inputs(dit, 1000)
    with pytest.raises(ValueError, match="choose one of zeros, random"):
        probe.probe_inputs(dit, 10, text="clip")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(CheckpointError, match="holds a UNet2DConditionModel; the probe reads"):
        probe.load_transformer(tmp_path / "unet")
    with pytest.raises(CheckpointError, match="not a diffusers model folder or hub id"):
        probe.load_transformer(tmp_path / "missing.safetensors")


def test_cli_writes_tables(folders, tmp_path, capsys):
    out = tmp_path / "probe.md"
    probe_cli.main([str(folders["sd3"]), "--timesteps", "200,800", "--text-length", "5", "--text", "random",
                "--out", str(out)])
    text = out.read_text()
    assert "| sd3 | image |" in text and probe.SUMMARY_HEADER in text and "RANDOM stand-in" in text
    with pytest.raises(SystemExit) as e:
        probe_cli.main([str(folders["dit"]), "--class-label", "207"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "probe.py: error: class 207 out of range: the model has classes 0..9\n"
    with pytest.raises(SystemExit):
        probe_cli.main(["--help"])
    assert "python probe.py facebook/DiT-XL-2-256" in capsys.readouterr().out


def test_pixart_alpha_size_and_aspect_conditions_are_given():
    from diffusers import PixArtTransformer2DModel

    # 24 wide: diffusers gives the size and aspect-ratio embeddings a third of the width each
    model = PixArtTransformer2DModel(num_attention_heads=3, attention_head_dim=8, num_layers=1,
                                     sample_size=4, cross_attention_dim=24, caption_channels=8,
                                     use_additional_conditions=True)
    inputs, _ = probe.probe_inputs(model.eval(), 300, batch_size=2, text_length=3)
    assert inputs["added_cond_kwargs"]["resolution"].tolist() == [[32.0, 32.0]] * 2  # 4 latents = 32 pixels
    assert probe.capture_streams(model, inputs)["image"][0][1].shape == (2, 4, 24)


def test_evenly_spaced_layers_and_bfloat16(folders):
    assert probe.evenly(57, 5) == [0, 14, 28, 42, 56] and probe.evenly(3, 28) == [0, 1, 2]
    assert probe.evenly(10, 1) == [9] and probe.evenly(10, 0) == []
    model = probe.load_transformer(folders["flux"], dtype="bfloat16")
    inputs, _ = probe.probe_inputs(model, 500, text_length=5, latent_size=4)
    assert inputs["hidden_states"].dtype == torch.bfloat16 and inputs["timestep"].dtype == torch.float32
    assert probe.capture_streams(model, inputs)["image"][-1][1].dtype == torch.float32  # stored as float32
    with pytest.raises(ValueError, match="choose one of float32, bfloat16, float16"):
        probe.load_transformer(folders["flux"], dtype="fp8")
