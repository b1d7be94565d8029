"""settings.py: impossible settings, contradicting flags and unusable saved runs are refused
before any work, each with a message that names the flag or file."""

import json

import pytest

import train
from settings import parse_args
from test_train import copy_run


@pytest.mark.parametrize("argv, message", [
    (["--image-size", "30"], "--downsample must be 2, 4, 8 or 16 and divide --image-size"),
    (["--image-size", "36"], "--purpose generate uses --downsample 8 unless given: give "
                             "--downsample 4"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--width", "4"], "--width must be at least 8"),
    (["--ema-decay", "1.5"], "--ema-decay must be between 0 and 1"),
    (["--seed", "-1"], "--seed must be between 0 and 2**32 - 1"),
    (["--beta", "-1"], "--beta must be a number >= 0"),
    (["--learning-rate", "nan"], "--learning-rate must be a positive number"),
    (["--prior-dropout", "1"], "--prior-dropout must be at least 0 and below 1"),
    (["--prior-dropout", "-0.1"], "--prior-dropout must be at least 0 and below 1"),
    (["--out", __file__], "is, or is inside, a file, not a folder"),
])
def test_impossible_settings_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_resume_names_every_flag_that_contradicts_the_saved_run(trained_run, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--resume", "--out", str(trained_run), "--codebook-size", "32",
                          "--code-dim", "8", "--image-size", "64", "--downsample", "8"])
    message = capsys.readouterr().err
    for mismatch in ("--codebook-size 32 (the run has 16)", "--code-dim 8 (the run has 4)",
                     "--image-size 64 (the run has 32)", "--downsample 8 (the run has 4)"):
        assert mismatch in message
    assert "Only --epochs, --time-limit, --out, --prior-epochs" in message
    config, _ = parse_args(["--resume", "--out", str(trained_run), "--codebook-size",
                                  "16", "--epochs", "3"])  # agreeing with the run is fine
    assert config.codebook_size == 16 and config.epochs == 3


def test_resume_without_a_saved_run_says_so(tmp_path):
    with pytest.raises(SystemExit, match="--resume needs .*config.json"):
        train.main(["--resume", "--out", str(tmp_path)])


def test_resume_takes_saved_settings_and_any_given_epochs_or_time_limit(trained_run):
    config, resume = parse_args(["--resume", "--out", str(trained_run), "--epochs", "20",
                                       "--time-limit", "0"])
    assert resume and config.image_size == 32 and config.codebook_size == 16
    assert config.epochs == 20 and config.time_limit == 0  # defaults, still taken when given
    assert config.out == str(trained_run)


def test_an_out_folder_inside_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path / "file" / "run")])
    assert "is, or is inside, a file" in capsys.readouterr().err


# --- bad data and bad run files ---------------------------------------------------------------


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["train"].pop("codebook_size"), "missing setting 'codebook_size'"),
    (lambda c: c["train"].update(colour="blue"), "unknown setting 'colour'"),
    (lambda c: c["train"].update(epochs="many"), "epochs = 'many' is not of the saved kind"),
    (lambda c: c["train"].update(precision="fp8"), "precision = 'fp8' is not one of auto"),
    (lambda c: c.pop("splits"), "its splits are missing"),
])
def test_a_config_json_from_another_version_or_edited_is_refused(trained_run, tmp_path, edit,
                                                                 message, capsys):
    out = copy_run(trained_run, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    edit(config)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=f"config.json was written by another version .*"
                                         f"{message}"):
        train.main(["--resume", "--epochs", "3", "--out", str(out)])


# --- --jit-compile ----------------------------------------------------------------------------


def test_jit_compile_takes_its_three_choices_and_auto_is_off(capsys):
    for choice, xla in (("auto", False), ("on", True), ("off", False)):
        config, _ = parse_args(["--jit-compile", choice])
        assert config.jit_compile == choice and train.use_xla(choice) is xla
    assert parse_args([])[0].jit_compile == "auto"
    with pytest.raises(SystemExit):
        parse_args(["--jit-compile", "yes"])
    assert "invalid choice: 'yes'" in capsys.readouterr().err


def test_a_config_json_saved_before_jit_compile_existed_still_resumes(trained_run, tmp_path):
    out = copy_run(trained_run, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    del config["train"]["jit_compile"]
    (out / "config.json").write_text(json.dumps(config))
    resumed, _ = parse_args(["--resume", "--out", str(out), "--epochs", "3"])
    assert resumed.jit_compile == "auto"
    # it changes how steps run, not the model, so a resumed run may switch it
    resumed, _ = parse_args(["--resume", "--out", str(out), "--jit-compile", "on"])
    assert resumed.jit_compile == "on"


def test_a_new_prior_on_a_run_saved_with_batches_of_32_keeps_them_unless_told(trained_run,
                                                                             tmp_path):
    out = copy_run(trained_run, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    config["train"]["prior_batch_size"] = 32  # the default before 8
    (out / "config.json").write_text(json.dumps(config))
    for path in out.glob("prior_*"):
        path.unlink()
    kept, _ = parse_args(["--prior-only", "--out", str(out)])
    assert kept.prior_batch_size == 32  # a saved run keeps its settings
    told, _ = parse_args(["--prior-only", "--out", str(out), "--prior-batch-size", "8"])
    assert told.prior_batch_size == 8


def test_a_config_json_saved_before_prior_dropout_reads_zero_and_a_new_prior_may_set_it(
        trained_run, tmp_path, capsys):
    out = copy_run(trained_run, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    del config["train"]["prior_dropout"]
    (out / "config.json").write_text(json.dumps(config))
    resumed, _ = parse_args(["--resume", "--out", str(out), "--epochs", "3"])
    assert resumed.prior_dropout == 0.0
    with pytest.raises(SystemExit):  # dropout is part of the saved prior
        parse_args(["--resume", "--out", str(out), "--prior-dropout", "0.1"])
    assert "--prior-dropout 0.1 (the run has 0.0)" in capsys.readouterr().err
    for path in out.glob("prior_*"):
        path.unlink()
    new_prior, _ = parse_args(["--prior-only", "--out", str(out), "--prior-dropout", "0.1"])
    assert new_prior.prior_dropout == 0.1


# --- --purpose --------------------------------------------------------------------------------


def test_purpose_sizes_the_first_stage_and_given_flags_win():
    generate, _ = parse_args([])  # no model flags: the model that generates well
    assert generate.purpose == "generate"
    assert (generate.downsample, generate.width, generate.res_blocks) == (8, 128, 2)
    sharp, _ = parse_args(["--purpose", "reconstruct"])
    assert (sharp.downsample, sharp.width, sharp.res_blocks) == (4, 64, 1)
    mixed, _ = parse_args(["--width", "32", "--res-blocks", "0"])
    assert (mixed.downsample, mixed.width, mixed.res_blocks) == (8, 32, 0)
    odd, _ = parse_args(["--image-size", "36", "--downsample", "4"])
    assert (odd.downsample, odd.width, odd.res_blocks) == (4, 128, 2)


def test_a_config_json_saved_before_purpose_and_decoder_output_resumes_as_built(trained_run,
                                                                                tmp_path, capsys):
    out = copy_run(trained_run, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    del config["train"]["purpose"], config["train"]["decoder_output"]
    (out / "config.json").write_text(json.dumps(config))
    resumed, _ = parse_args(["--resume", "--out", str(out), "--epochs", "3"])
    assert resumed.purpose == "reconstruct"  # a label: the run keeps its sizes
    assert resumed.decoder_output == "subpixel"  # as every run saved since 012e838
    assert (resumed.downsample, resumed.width, resumed.res_blocks) == (4, 8, 1)
    with pytest.raises(SystemExit):
        parse_args(["--resume", "--out", str(out), "--purpose", "generate"])
    assert "--purpose 'generate' (the run has 'reconstruct')" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the decoder is part of the saved model
        parse_args(["--resume", "--out", str(out), "--decoder-output", "transposed"])
    assert "--decoder-output 'transposed' (the run has 'subpixel')" in capsys.readouterr().err
