"""`python dataset.py prepare`: tiny synthetic OASIS-1 sessions (Analyze files in the release's
folder layout, one disc as a .tar.gz) converted to the course zip's PNG layout."""

import csv
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import dataset
import oasis1
from conftest import TINY

SHAPE = (24, 28, 24)  # as stored: x runs to the subject's left (Analyze's LAS), y front, z up
BRAIN_CENTRE = (14, 15, 10)  # off the volume's centre (11.5, 13.5, 11.5) on every axis
SETTINGS = dict(slices=4, slice_spacing=2, image_size=32, split=(34, 33, 33))
CDR = {"OAS1_0001": "", "OAS1_0002": "0", "OAS1_0003": "0.5", "OAS1_0004": "1",
       "OAS1_0005": "0", "OAS1_0006": "0.5"}
METADATA_COLUMNS = ["M/F", "Hand", "Age", "Educ", "SES", "MMSE", "CDR", "eTIV", "nWBV", "ASF",
                    "Delay"]


def synthetic_head(seed):
    """(skull-stripped T1, T1 with scalp, labels) int16 volumes of SHAPE in LAS storage: an
    ellipsoid brain (white matter in grey matter in CSF), a scalp shell around it, and a bright
    blob in the subject's left anterior part of the brain."""
    i, j, k = np.indices(SHAPE)
    ci, cj, ck = BRAIN_CENTRE
    radius = ((i - ci) / 7) ** 2 + ((j - cj) / 9) ** 2 + ((k - ck) / 6) ** 2
    labels = np.select([radius < 0.35, radius < 0.7, radius < 1], [3, 2, 1], 0)
    brain = np.choose(labels, [0, 30, 80, 110]) + np.random.default_rng(seed).integers(0, 4, SHAPE)
    blob = (i >= ci + 2) & (i < ci + 5) & (j >= cj + 3) & (j < cj + 7) & (labels > 0)
    brain = np.where(labels > 0, np.where(blob, 400, brain), 0)
    head = brain + 250 * ((radius >= 1.2) & (radius < 1.8))
    return brain.astype(np.int16), head.astype(np.int16), labels.astype(np.int16)


def save_analyze(path, data):
    nib.AnalyzeImage(data, None).to_filename(f"{path}.img")  # writes .img and .hdr


def make_session(disc, session, with_seg=True, time_axis=False):
    """A session folder as in the release; time_axis stores x, y, z, 1 volumes."""
    volumes = synthetic_head(seed=int(session[5:9]) * 10 + int(session[-1]))
    brain, head, labels = (v[..., None] if time_axis else v for v in volumes)
    base = f"{session}_mpr_n4_anon_111_t88"
    t88 = disc / session / "PROCESSED" / "MPRAGE" / "T88_111"
    t88.mkdir(parents=True)
    save_analyze(t88 / f"{base}_masked_gfc", brain)
    save_analyze(t88 / f"{base}_gfc", head)
    if with_seg:
        (disc / session / "FSL_SEG").mkdir()
        save_analyze(disc / session / "FSL_SEG" / f"{base}_masked_gfc_fseg", labels)
    (disc / session / "RAW").mkdir()
    (disc / session / "RAW" / f"{session}_mpr-1_anon.img").write_bytes(b"\0" * 64)  # ignored
    (disc / session / f"{session}.txt").write_text(f"SESSION ID:  {session}\n")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """disc1/ with five sessions (two of OAS1_0001), disc2.tar.gz holding disc2/OAS1_0003_MR1
    (4D volumes) and OAS1_0004_MR1 (no segmentation), and oasis_cross-sectional.csv."""
    root = tmp_path_factory.mktemp("release")
    for session in ("OAS1_0001_MR1", "OAS1_0001_MR2", "OAS1_0002_MR1", "OAS1_0005_MR1",
                    "OAS1_0006_MR1"):
        make_session(root / "disc1", session)
    make_session(root / "staging" / "disc2", "OAS1_0003_MR1", time_axis=True)
    make_session(root / "staging" / "disc2", "OAS1_0004_MR1", with_seg=False)
    with tarfile.open(root / "disc2.tar.gz", "w:gz") as tar:
        tar.add(root / "staging" / "disc2", arcname="disc2")
    rows = [["ID", *METADATA_COLUMNS]]
    for subject, cdr in CDR.items():
        for visit in ("MR1", "MR2") if subject == "OAS1_0001" else ("MR1",):
            rows.append([f"{subject}_{visit}", "F", "R", str(20 + int(subject[-1])), "", "", "",
                         cdr, "1500", "0.8", "1.2", "0" if visit == "MR1" else "30"])
    with open(root / "oasis_cross-sectional.csv", "w", newline="") as file:
        csv.writer(file).writerows(rows)
    return root


def run_prepare(release, out, paths=("disc1", "disc2.tar.gz"), **changes):
    return oasis1.prepare([release / p for p in paths], out,
                          metadata=release / "oasis_cross-sectional.csv",
                          **{**SETTINGS, **changes})


@pytest.fixture(scope="module")
def prepared(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "keras_png_slices_data"
    return out, run_prepare(release, out)


def read_manifest(out):
    with open(out / "manifest.csv", newline="") as file:
        return list(csv.DictReader(file))


def png(out, name):
    return np.asarray(Image.open(out / name))


def files_and_bytes(out):
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_layout_names_and_counts_match_the_course_zip(prepared):
    out, summary = prepared
    assert sorted(summary["converted"]) == ["OAS1_0001_MR1", "OAS1_0001_MR2", "OAS1_0002_MR1",
                                            "OAS1_0003_MR1", "OAS1_0005_MR1", "OAS1_0006_MR1"]
    assert list(summary["skipped"]) == ["OAS1_0004_MR1"]
    assert "FSL_SEG/*_t88_masked_gfc_fseg.img" in summary["skipped"]["OAS1_0004_MR1"]
    dirs = dataset.oasis_split_dirs(out)  # what train.py and predict.py read
    images = {split: dataset.list_images(folder) for split, folder in dirs.items()}
    assert sum(map(len, images.values())) == 6 * 4 == len(read_manifest(out))
    assert {split: len(paths) for split, paths in images.items()} == summary["slices"]
    for split, paths in images.items():
        segs = sorted(p.name for p in (out / f"keras_png_slices_seg_{split}").iterdir())
        names = [Path(p).name for p in paths]
        assert all(re.fullmatch(r"case_\d{3}_slice_[0-3]\.nii\.png", n) for n in names)
        assert segs == [n.replace("case_", "seg_") for n in names]
        assert all(Image.open(p).size == (32, 32) and Image.open(p).mode == "L" for p in paths)


def test_subjects_never_span_two_splits_and_the_split_ignores_the_path_order(prepared, release,
                                                                            tmp_path):
    out, _ = prepared
    rows = read_manifest(out)
    splits = {}
    for row in rows:
        splits.setdefault(row["subject"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits.values()) and len(splits) == 5
    sessions = {row["session"]: row["split"] for row in rows}
    assert sessions["OAS1_0001_MR1"] == sessions["OAS1_0001_MR2"]
    assert set(sessions.values()) == {"train", "validate", "test"}
    # another order (disc2 unpacked, one session given twice) numbers the cases differently,
    # but every session's split and pixels are the same
    reversed_out = tmp_path / "reversed"
    summary = run_prepare(release, reversed_out,
                          paths=("staging/disc2", "disc1/OAS1_0006_MR1", "disc1"))
    assert summary["converted"][:2] == ["OAS1_0003_MR1", "OAS1_0006_MR1"]
    assert summary["already_done"] == ["OAS1_0006_MR1"]
    by_slice = lambda o: {(r["session"], r["slice"]): (r["split"], png(o, r["image"]).tobytes())
                          for r in read_manifest(o)}
    assert by_slice(reversed_out) == by_slice(out)


def test_masks_hold_only_the_four_label_values(prepared):
    out, _ = prepared
    values = set()
    for row in read_manifest(out):
        values |= set(np.unique(png(out, row["seg"])).tolist())
    assert values == {0, 85, 170, 255}


def test_radiological_orientation_puts_the_left_anterior_marker_top_right(prepared):
    out, _ = prepared
    # nibabel reads Analyze as LAS: array index i runs towards the subject's left
    assert nib.aff2axcodes(nib.AnalyzeImage(np.zeros(SHAPE, np.int16), None)
                           .header.get_best_affine()) == ("L", "A", "S")
    for row in read_manifest(out):
        image, seg = png(out, row["image"]), png(out, row["seg"])
        marker = np.argwhere(image > 200).mean(0)
        brain = np.argwhere(seg > 0).mean(0)
        assert marker[0] < brain[0] - 2 and marker[1] > brain[1] + 2  # anterior up, left right
        assert brain[1] > 16  # the brain sits towards the subject's left: the image's right
        overlap = ((image > 0) & (seg > 0)).sum() / ((image > 0) | (seg > 0)).sum()
        assert overlap > 0.85  # image and mask are drawn the same way round


def test_orientation_is_read_from_the_affine_not_the_storage_order():
    brain, _, _ = synthetic_head(seed=0)
    ras = brain[::-1].astype(np.float32)  # LAS storage -> RAS array
    las = nib.AnalyzeImage(brain, None)
    las = nib.AnalyzeImage(brain, las.header.get_best_affine())
    # the same head stored posterior->anterior first, inferior->superior second, then L->R
    pir = ras.transpose(1, 2, 0)[::-1, ::-1]
    pir_affine = np.array([[0, 0, 1, 0], [-1, 0, 0, 27], [0, -1, 0, 23], [0, 0, 0, 1.0]])
    for image in (las, nib.Nifti1Image(pir, pir_affine)):
        volume, voxel_mm = oasis1.canonical_volume(image)
        np.testing.assert_array_equal(volume, ras)
        np.testing.assert_allclose(voxel_mm, 1.0)


def test_slices_are_centred_on_the_brain_and_scaled_by_its_99_5th_percentile(prepared):
    out, _ = prepared
    rows = [r for r in read_manifest(out) if r["session"] == "OAS1_0002_MR1"]
    # brain from z = 5 to 15: centre 10, not the volume's 11.5; 4 slices, 2 apart, upwards
    assert [(r["slice"], r["axial_index"]) for r in rows] == [("0", "7"), ("1", "9"),
                                                               ("2", "11"), ("3", "13")]
    image, seg = png(out, rows[1]["image"]), png(out, rows[1]["seg"])
    assert image.max() == 255 and image[seg == 0].max() < 40  # the blob saturates; black outside
    white = image[(seg == 255) & (image < 200)]  # white matter: 110-113, the blob 400
    assert abs(np.median(white) - 111.5 / 400 * 255) < 5


def test_keep_skull_uses_the_unmasked_image(release, tmp_path):
    session = [release / "disc1" / "OAS1_0002_MR1"]
    stripped = oasis1.prepare(session, tmp_path / "a", slices=1, image_size=32)
    with_skull = oasis1.prepare(session, tmp_path / "b", slices=1, image_size=32, keep_skull=True)
    assert stripped["converted"] == with_skull["converted"] == ["OAS1_0002_MR1"]
    outside = lambda out: png(out, read_manifest(out)[0]["image"])[
        png(out, read_manifest(out)[0]["seg"]) == 0]
    assert outside(tmp_path / "a").max() < 40 and (outside(tmp_path / "b") > 100).sum() > 20


def test_manifest_maps_files_to_sessions_with_the_metadata_columns(prepared):
    out, _ = prepared
    rows = read_manifest(out)
    assert list(rows[0]) == oasis1.COLUMNS + METADATA_COLUMNS
    assert [r["slice"] for r in rows] == ["0", "1", "2", "3"] * 6
    for row in rows:
        assert row["subject"] == row["session"][:9]
        assert row["CDR"] == CDR[row["subject"]]
        assert row["Age"] == str(20 + int(row["subject"][-1]))
        assert row["image"] == (f"keras_png_slices_{row['split']}/case_{row['case']}_slice_"
                                f"{row['slice']}.nii.png")
        assert (out / row["seg"]).is_file() and f"seg_{row['case']}_" in row["seg"]
    assert len({r["case"] for r in rows}) == 6 and {r["Delay"] for r in rows} == {"0", "30"}


def test_an_interrupted_run_resumes_without_duplicates(prepared, release, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    real_write, calls = oasis1.write_atomically, []

    def dying_write(*args, **kwargs):  # the marker, 8 PNGs and the manifest, then 3 PNGs
        calls.append(args[0])
        if len(calls) == 14:
            raise KeyboardInterrupt("killed")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(oasis1, "write_atomically", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(release, out)
    monkeypatch.setattr(oasis1, "write_atomically", real_write)
    assert len(read_manifest(out)) == 4 and len(list(out.rglob("*.png"))) == 8 + 3
    (out / "keras_png_slices_train" / ".case_002_slice_0.nii.png.partial").write_bytes(b"cut")
    summary = run_prepare(release, out)
    assert summary["already_done"] == ["OAS1_0001_MR1"] and len(summary["converted"]) == 5
    assert files_and_bytes(out) == files_and_bytes(prepared[0])  # as if never interrupted
    again = run_prepare(release, out)
    assert again["converted"] == [] and len(again["already_done"]) == 6
    assert files_and_bytes(out) == files_and_bytes(prepared[0])


def test_stratified_split_gives_every_split_the_same_cdr_mix():
    table = {f"OAS1_{n:04d}_MR1": {"CDR": cdr} for n, cdr in enumerate(
        [""] * 20 + ["0"] * 20 + ["0.5"] * 10 + ["1"] * 10, start=1)}
    places = oasis1.subject_places(table, seed=3, stratify_cdr=True)
    counts = {}
    for session, row in table.items():
        key = (row["CDR"], oasis1.split_of(places[session[:9]], (50, 30, 20)))
        counts[key] = counts.get(key, 0) + 1
    assert counts == {**{(c, s): n for c in ("", "0") for s, n in
                         (("train", 10), ("validate", 6), ("test", 4))},
                      **{(c, s): n for c in ("0.5", "1") for s, n in
                         (("train", 5), ("validate", 3), ("test", 2))}}
    plain = oasis1.subject_places(table, seed=3, stratify_cdr=False)
    assert sorted(oasis1.split_of(p, (85, 10, 5)) for p in plain.values()).count("test") == 3
    assert plain != oasis1.subject_places(table, seed=4, stratify_cdr=False)


def fail(argv):
    with pytest.raises(SystemExit) as exit_info:
        oasis1.main([str(a) for a in argv])
    return str(exit_info.value.code)


def test_paths_that_are_not_oasis1_are_named(tmp_path):
    (tmp_path / "photos" / "holiday").mkdir(parents=True)
    (tmp_path / "slices.zip").write_bytes(b"PK\x03\x04")
    for path, expected in ((tmp_path / "photos", "holds no OASIS-1 session folders"),
                           (tmp_path / "slices.zip", "is a file but not a .tar.gz"),
                           (tmp_path / "nowhere", "does not exist")):
        message = fail(["--oasis1", path, "--out", tmp_path / "out"])
        assert message.startswith(f"error: --oasis1 {path} {expected}")
        assert "oasis_cross-sectional_discN.tar.gz" in message
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are checked


def test_a_tarball_is_streamed_and_only_the_needed_files_are_read(release, tmp_path,
                                                                  monkeypatch):
    modes, read = [], []
    real_open, real_extract = tarfile.open, tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile, "open", lambda path, mode, **kw: modes.append(mode) or
                        real_open(path, mode, **kw))
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, member: read.append(
        member.name.split("/")[-1]) or real_extract(self, member))
    summary = oasis1.prepare([release / "disc2.tar.gz"], tmp_path / "out", **SETTINGS)
    assert modes == ["r|gz"] and summary["converted"] == ["OAS1_0003_MR1"]
    assert sorted(read) == sorted(
        [f"OAS1_0003_MR1_mpr_n4_anon_111_t88_masked_gfc{seg}.{ext}" for seg in ("", "_fseg")
         for ext in ("hdr", "img")] + [f"OAS1_0004_MR1_mpr_n4_anon_111_t88_masked_gfc.{ext}"
                                       for ext in ("hdr", "img")])


def test_a_truncated_tarball_is_named(release, tmp_path):
    data = (release / "disc2.tar.gz").read_bytes()
    (tmp_path / "disc2.tar.gz").write_bytes(data[:len(data) // 2])
    message = fail(["--oasis1", tmp_path / "disc2.tar.gz", "--out", tmp_path / "out"])
    assert re.match(r"error: .*disc2\.tar\.gz is truncated or damaged .*download it again",
                    message)


def test_a_truncated_image_skips_its_session_and_says_which_file(release, tmp_path, capsys):
    shutil.copytree(release / "disc1" / "OAS1_0002_MR1", tmp_path / "OAS1_0002_MR1")
    img = next((tmp_path / "OAS1_0002_MR1").rglob("*_masked_gfc.img"))
    img.write_bytes(img.read_bytes()[:1000])
    summary = oasis1.prepare([tmp_path / "OAS1_0002_MR1"], tmp_path / "out", image_size=32)
    assert summary["converted"] == [] and f"{img} is unreadable or truncated" in \
        summary["skipped"]["OAS1_0002_MR1"]
    assert f"OAS1_0002_MR1: {img} is unreadable" in capsys.readouterr().out


def test_an_output_folder_holding_another_data_set_is_refused(release, tmp_path):
    (tmp_path / "course" / "keras_png_slices_train").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "course" / "keras_png_slices_train" / "case_1.png")
    message = fail(["--oasis1", release / "disc1", "--out", tmp_path / "course"])
    assert "did not write (it has no oasis1_prepare.json)" in message
    assert "give an empty or new --out folder" in message


def test_a_run_killed_while_writing_its_settings_file_resumes(release, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".oasis1_prepare.json.partial").write_text('{"writ')
    summary = oasis1.prepare([release / "disc1" / "OAS1_0002_MR1"], tmp_path / "out", slices=1,
                             image_size=32)
    assert summary["converted"] == ["OAS1_0002_MR1"]


def test_resuming_with_other_settings_is_refused_naming_them(prepared, release):
    message = fail(["--oasis1", release / "disc1", "--out", prepared[0], "--slices", "6",
                    "--keep-skull", "--split", "34", "33", "33", "--image-size", "32",
                    "--metadata", release / "oasis_cross-sectional.csv"])
    assert "was made with other settings" in message
    assert "--slices 4 there, 6 now" in message and "--keep-skull False there, True now" in message
    assert "--slice-spacing" not in message


def test_dataset_py_prepare_reaches_oasis1_and_exits_with_its_message(tmp_path):
    result = subprocess.run([sys.executable, "dataset.py", "prepare", "--oasis1", str(tmp_path),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 1
    assert f"error: --oasis1 {tmp_path} holds no OASIS-1 session folders" in result.stderr


def test_train_py_trains_on_the_prepared_folder(prepared, tmp_path):
    import train

    run = tmp_path / "run"
    train.main(["--data", str(prepared[0]), "--out", str(run), *TINY, "--epochs", "1",
                "--prior-epochs", "0"])
    assert (run / "best.keras").is_file() and (run / "training_log.csv").is_file()
