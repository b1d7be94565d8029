"""study.py: a tiny run trains and scores each variant on the way and counts its FLOPs; the
Pareto front keeps exactly the undominated variants; bad flags are refused; time to quality
scores both models at each budget."""

import argparse
import dataclasses
import json
import math

import pytest

import bench
import study
from conftest import write_slices
from settings import check, purpose_config


def test_a_tiny_study_scores_every_variant_and_counts_its_flops(tmp_path):
    train_dir = write_slices(tmp_path / "train", 24, seed=0, size=32)
    val_dir = write_slices(tmp_path / "validate", 6, seed=1, size=32)
    out = tmp_path / "study.json"
    study.main(["--tiny", "--steps", "4", "--variants", "default,width 32,reference",
                "--train-dir", str(train_dir), "--val-dir", str(val_dir), "--out", str(out)])
    saved = json.loads(out.read_text())
    variants = saved["variants"]
    assert list(variants) == ["default", "width 32", "reference"]
    for result in variants.values():
        seen = [s["images_seen"] for s in result["scores"]]
        assert seen == [8, 16, 32]  # after 1, 2 and 4 steps of 8 images
        for s in result["scores"]:
            assert -1 <= s["ssim"] <= 1 and math.isfinite(s["psnr_db"]) and s["minutes"] > 0
    # the tiny base model has width 8: width 32 costs more per image, and has more weights
    assert variants["width 32"]["gflop_per_image"] > variants["default"]["gflop_per_image"] > 0
    assert variants["width 32"]["parameters"] > variants["default"]["parameters"]
    assert saved["pareto_front"] and set(saved["pareto_front"]) <= set(variants)
    assert saved["steps"] == 4 and saved["environment"]["tiny"] is True


def scored(gflop, ssim):
    return {"gflop_per_image": gflop, "scores": [{"ssim": 0.0}, {"ssim": ssim}]}


def test_the_front_keeps_the_undominated_variants_and_leaves_out_repeats():
    results = {"default": scored(6.0, 0.95), "default seed 1": scored(6.0, 0.99),
               "width 32": scored(3.0, 0.93), "width 48": scored(4.5, 0.92),
               "2 residual blocks": scored(7.0, 0.95), "reference": scored(2.7, 0.90)}
    # width 48 is beaten by width 32 (cheaper and better); 2 blocks by the default (same SSIM,
    # more FLOPs); the seed repeat is a noise estimate, never a competitor
    assert study.pareto_front(results) == ["default", "width 32", "reference"]


@pytest.mark.parametrize("flags, message", [
    (["--variants", "default,wider"], "unknown ['wider']"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_bad_flags_are_refused_with_the_reason(flags, message, capsys):
    with pytest.raises(SystemExit):
        study.parse_args(["--train-dir", "t", "--val-dir", "v", *flags])
    assert message in capsys.readouterr().err


def test_every_variant_is_a_valid_config():
    parser = argparse.ArgumentParser()  # check() calls parser.error (SystemExit) on a bad one
    for overrides in filter(None, study.VARIANTS.values()):
        check(dataclasses.replace(purpose_config("reconstruct"), **overrides), parser)


def test_every_variant_name_survives_the_comma_separated_flag():
    assert study.parse_args(["--train-dir", "t", "--val-dir", "v"]).variants == list(
        study.VARIANTS)


def test_time_to_quality_scores_both_models_at_each_budget(tmp_path):
    train_dir = write_slices(tmp_path / "train", 16, seed=0, size=32)
    val_dir = write_slices(tmp_path / "validate", 4, seed=1, size=32)
    budgets = [0.002, 0.004]  # minutes: a few tiny steps each
    config = purpose_config("reconstruct", **bench.TINY)
    quality = study.time_to_quality(config, budgets, str(train_dir), str(val_dir))
    for kind in ("ours", "reference"):
        scores = quality[kind]
        assert len(scores) == 2
        assert [s["minutes"] >= b for s, b in zip(scores, budgets)] == [True, True]
        assert 0 < scores[0]["images_seen"] < scores[1]["images_seen"]
        for s in scores:
            assert -1 <= s["ssim"] <= 1 and math.isfinite(s["psnr_db"])
