"""Build the OASIS slice data set, in the course zip's layout, from the official OASIS-1 release.

    python dataset.py prepare --oasis1 PATH... [--out data/keras_png_slices_data]
                              [--metadata oasis_cross-sectional.csv] [--stratify-cdr]

PATH: disc tarballs (streamed, never unpacked: a session's four needed files are held in memory
until it is converted), extracted disc folders, session folders, or a folder of discs. Per
session: PROCESSED/MPRAGE/T88_111/*_t88_masked_gfc (skull stripped; *_t88_gfc with --keep-skull)
and FSL_SEG/*_fseg (0 background, 1 CSF, 2 grey, 3 white matter), Analyze files. Conventions:

Orientation: as_closest_canonical gives RAS voxel order from nibabel's affine (for Analyze,
    which stores none, nibabel assumes radiological LAS storage); slices are drawn as
    radiologists view them: anterior at the top, the subject's left on the image's right.
Slices: --slices levels --slice-spacing voxels apart, centred half-way between the lowest and
    highest level holding labelled tissue (not the volume's centre); S = 0 is the most inferior.
Intensity: per volume, 0 -> 0 and the 99.5th percentile of brain voxels (label > 0) -> 255,
    clipped. Size: --image-size squared, aspect kept, centred on black; labels nearest
    neighbour, saved as label x 85 (0, 85, 170, 255).
Names: keras_png_slices_{split}/case_NNN_slice_S.nii.png, keras_png_slices_seg_{split}/
    seg_NNN_slice_S.nii.png; NNN counts sessions (001, ...) in the order they are converted.
    manifest.csv maps each file to its subject, session, axial level (and the csv's columns).
Splits, by subject: its place in [0, 1) is the SHA-256 of --seed and its id as a fraction or,
    with --metadata, its rank by that hash among the csv's subjects (per CDR group with
    --stratify-cdr; no CDR is a group), scaled. Below 0.85 train, below 0.95 validate, else test
    (--split). It never depends on the PATHs, their order or an earlier run. With --metadata the
    shares are exact over the release (354/41/21 subjects); without, on average (test 21 +- 4).
Resume: files are written under temporary names, then renamed; a session is done once its rows
    are in manifest.csv. A rerun skips done sessions and deletes our files not in the manifest;
    oasis1_prepare.json holds the settings: other ones, or a folder we did not write, are refused.
"""

import argparse
import csv
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import zlib
from pathlib import Path, PurePosixPath

import keras
import nibabel as nib
import numpy as np
from PIL import Image

from dataset import SPLITS, DataError

MARKER, MANIFEST = "oasis1_prepare.json", "manifest.csv"
COLUMNS = ["case", "slice", "split", "subject", "session", "axial_index", "image", "seg"]
SESSION = re.compile(r"OAS1_\d{4}_MR\d+")
# e.g. OAS1_0001_MR1_mpr_n4_anon_111_t88_masked_gfc_fseg.img (n4: scans averaged, varies)
FILE = re.compile(r"(OAS1_\d{4}_MR\d+)_mpr_n\d+_anon_111_t88(_masked)?_gfc(_fseg)?\.(img|hdr)")
OURS = re.compile(r"\.?(case|seg)_\d+_slice_\d+\.nii\.png(\.partial)?")  # with temp names
NEEDED = [(role, ext) for role in ("image", "seg") for ext in ("img", "hdr")]
FLAGS = {"slices": "--slices", "slice_spacing": "--slice-spacing", "image_size": "--image-size",
         "keep_skull": "--keep-skull", "seed": "--seed", "split": "--split",
         "stratify_cdr": "--stratify-cdr", "metadata_sha256": "--metadata (SHA-256)"}
OASIS1_HELP = ("Expected the OASIS-1 cross-sectional release (https://www.oasis-brains.org): an "
               "oasis_cross-sectional_discN.tar.gz, an extracted disc folder (discN/) or a "
               "session folder (OAS1_0001_MR1/) holding PROCESSED/MPRAGE/T88_111/ and FSL_SEG/.")


class SkipSession(Exception):
    """A session that cannot be converted; the message says why, and the run goes on."""


def main(argv=None):
    options = vars(parse_args(argv))
    try:
        prepare(options.pop("oasis1"), options.pop("out"), **options)
    except DataError as error:
        sys.exit(f"error: {error}")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python dataset.py prepare",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--oasis1", nargs="+", required=True, metavar="PATH",
                        help="disc tarballs, extracted disc folders or session folders")
    parser.add_argument("--out", default="data/keras_png_slices_data")
    parser.add_argument("--metadata", help="oasis_cross-sectional.csv (manifest columns)")
    parser.add_argument("--slices", type=int, default=32, help="axial slices per session")
    parser.add_argument("--slice-spacing", type=int, default=2, help="in voxels (1 mm)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--keep-skull", action="store_true", help="use *_t88_gfc")
    parser.add_argument("--seed", type=int, default=0, help="fixes the subject split")
    parser.add_argument("--split", type=int, nargs=3, default=[85, 10, 5],
                        metavar=("TRAIN", "VALIDATE", "TEST"), help="percent of subjects")
    parser.add_argument("--stratify-cdr", action="store_true", help="needs --metadata")
    return parser.parse_args(argv)


def prepare(paths, out, metadata=None, slices=32, slice_spacing=2, image_size=256,
            keep_skull=False, seed=0, split=(85, 10, 5), stratify_cdr=False):
    """Converts the sessions under `paths` that `out` lacks; prints and returns a summary:
    {'converted', 'already_done': [session], 'skipped': {session: why}, 'slices': {split: n}}."""
    settings = {"slices": slices, "slice_spacing": slice_spacing, "image_size": image_size,
                "keep_skull": keep_skull, "seed": seed, "split": list(split),
                "stratify_cdr": stratify_cdr, "metadata_sha256": None}
    check_settings(settings, metadata)
    columns, table, places = list(COLUMNS), {}, None
    if metadata:
        settings["metadata_sha256"] = hashlib.sha256(Path(metadata).read_bytes()).hexdigest()[:16]
        extra, table = read_metadata(metadata)
        columns += extra
        places = subject_places(table, seed, stratify_cdr, metadata)
    sources = [find_source(path) for path in paths]  # all checked before anything is written
    out = Path(out)
    open_output(out, settings)
    rows = read_manifest_and_clean(out)
    done = {row["session"] for row in rows}
    summary = {"converted": [], "already_done": [], "skipped": {}}
    known = all(isinstance(s, list) for s in sources)  # a tarball's count is not
    progress = keras.utils.Progbar(sum(map(len, sources)) if known else None, unit_name="session")
    for session, pieces in session_pieces(sources, keep_skull, done):
        subject = session.rsplit("_MR", 1)[0]  # OAS1_0001_MR2 -> OAS1_0001
        try:
            if session in done:  # by an earlier run, or given twice
                summary["already_done"].append(session)
                continue
            if places is not None and subject not in places:
                raise SkipSession(f"not in --metadata {metadata}")
            if problem := missing(pieces, keep_skull):
                raise SkipSession(problem)
            images = convert_session(pieces, slices, slice_spacing, image_size)
        except SkipSession as why:
            summary["skipped"][session] = str(why)
            continue
        finally:
            progress.add(1)  # every session found: converted, skipped or done before
        place = places[subject] if places is not None else subject_hash(seed, subject)
        case = 1 + max((int(row["case"]) for row in rows), default=0)  # a cut-short one's reused
        new_rows = write_session(out, split_of(place, split), case, images, subject, session)
        rows += [{**table.get(session, {}), **row} for row in new_rows]  # ours win a name clash
        write_manifest(out, rows, columns)  # only now does the session count as done
        done.add(session)
        summary["converted"].append(session)
    summary["slices"] = {s: sum(row["split"] == s for row in rows) for s in SPLITS}
    print_summary(out, summary, rows)
    return summary


def check_settings(settings, metadata):
    split = settings["split"]
    for failed, message in [
            (settings["slices"] < 1, "--slices must be 1 or more"),
            (settings["slice_spacing"] < 1, "--slice-spacing must be 1 or more"),
            (settings["image_size"] < 8, "--image-size must be 8 or more"),
            (min(split) < 0 or sum(split) != 100 or split[0] == 0,
             "--split takes three percentages that add up to 100, train above 0"),
            (settings["stratify_cdr"] and not metadata,
             "--stratify-cdr needs --metadata oasis_cross-sectional.csv (it holds the CDR)"),
            (metadata and not Path(metadata).is_file(),
             f"--metadata {metadata} does not exist: give the path of oasis_cross-sectional.csv "
             f"from the OASIS-1 download page")]:
        if failed:
            raise DataError(f"{message}.")


# ---------------------------------------------------------------------------------------------
# Inputs: the sessions a PATH holds, and the four files each needs, as bytes

def find_source(path):
    """A tarball's Path, or the sorted list of session folders in a folder."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"--oasis1 {path} does not exist. {OASIS1_HELP}")
    if path.is_file():
        if not path.name.endswith((".tar.gz", ".tgz")):
            raise DataError(f"--oasis1 {path} is a file but not a .tar.gz. {OASIS1_HELP}")
        return path
    found = [path, *path.glob("*"), *path.glob("*/*")]  # a session, a disc, or a folder of discs
    sessions = sorted({p for p in found if p.is_dir() and SESSION.fullmatch(p.name)},
                      key=lambda p: p.name)
    if not sessions:
        raise DataError(f"--oasis1 {path} holds no OASIS-1 session folders (OAS1_xxxx_MRy/). "
                        f"{OASIS1_HELP}")
    return sessions


def needed_file(name, keep_skull):
    """(session, (role, ext)) when `name` is one of the files a session needs, else None."""
    match = FILE.fullmatch(name)
    if not match:
        return None
    session, masked, fseg, ext = match.groups()
    if fseg:
        return (session, ("seg", ext)) if masked else None
    return (session, ("image", ext)) if bool(masked) != keep_skull else None


def missing(pieces, keep_skull):
    """'' when a session has its four files, else what it lacks, e.g. 'no FSL_SEG/*_fseg.img'."""
    where = {"image": f"PROCESSED/MPRAGE/T88_111/*_t88{'' if keep_skull else '_masked'}_gfc",
             "seg": "FSL_SEG/*_t88_masked_gfc_fseg"}
    absent = [f"{where[role]}.{ext}" for role, ext in NEEDED if (role, ext) not in pieces]
    return "no " + ", ".join(absent) if absent else ""


def session_pieces(sources, keep_skull, done):
    """Yields (session, {(role, ext): (file name, bytes)}) per session found, whether or not
    it has all its files (see missing); a session in `done` comes unread, with None."""
    for source in sources:
        if isinstance(source, Path):
            yield from tarball_pieces(source, keep_skull, done)
            continue
        for folder in source:
            if folder.name in done:
                yield folder.name, None
                continue
            pieces = {}
            for file in [*folder.glob("PROCESSED/MPRAGE/T88_111/*"), *folder.glob("FSL_SEG/*")]:
                found = needed_file(file.name, keep_skull)
                if found and found[0] == folder.name:
                    pieces[found[1]] = (str(file), file.read_bytes())
            yield folder.name, pieces


def tarball_pieces(path, keep_skull, done):
    """session_pieces of one disc tarball, streamed: a session is yielded as soon as its four
    files are read (a session's members are contiguous in the release, so little is held); one
    that lacks some, at the end (only then is it known)."""
    pending = {}  # session -> pieces until yielded, then None; in the order first seen
    try:
        with tarfile.open(path, "r|gz") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                session = next((part for part in parts if SESSION.fullmatch(part)), None)
                if session and session not in pending:
                    pending[session] = None if session in done else {}
                    if session in done:
                        yield session, None
                found = needed_file(parts[-1], keep_skull) if member.isfile() else None
                if not found or found[0] != session or pending[session] is None:
                    continue
                pieces = pending[session]
                pieces[found[1]] = (f"{path}:{member.name}", tar.extractfile(member).read())
                if not missing(pieces, keep_skull):
                    pending[session] = None  # frees its bytes once converted
                    yield session, pieces
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise DataError(f"{path} is truncated or damaged ({error}): download it again. The "
                        f"sessions converted so far are kept; the same command resumes.") from None
    if not pending:
        raise DataError(f"--oasis1 {path} holds no OASIS-1 session folders. {OASIS1_HELP}")
    for session, pieces in pending.items():
        if pieces is not None:  # some of its files never came
            yield session, pieces


# ---------------------------------------------------------------------------------------------
# Conversion of one session

def read_volume(pieces, role):
    """A session's Analyze image or labels, from bytes -> canonical_volume."""
    name = pieces[role, "img"][0]
    holders = {"header": nib.FileHolder(fileobj=io.BytesIO(pieces[role, "hdr"][1])),
               "image": nib.FileHolder(fileobj=io.BytesIO(pieces[role, "img"][1]))}
    try:
        volume, voxel_mm = canonical_volume(nib.AnalyzeImage.from_file_map(holders))
    except Exception as error:  # nibabel raises many kinds for damaged or truncated files
        raise SkipSession(f"{name} is unreadable or truncated "
                          f"({' '.join(str(error).split())}): download its disc again") from None
    if volume.ndim != 3:
        raise SkipSession(f"{name} is not a 3D volume (shape {volume.shape})")
    return volume, voxel_mm


def canonical_volume(image):
    """A nibabel image -> (float32 volume in RAS voxel order, voxel sizes in mm along x, y, z).
    The orientation comes from the image's affine, whatever order the file stores."""
    canonical = nib.as_closest_canonical(image)
    volume = np.asanyarray(canonical.dataobj, dtype=np.float32)
    if volume.ndim > 3 and all(n == 1 for n in volume.shape[3:]):
        volume = volume.reshape(volume.shape[:3])  # x, y, z, 1: one time point
    return volume, nib.affines.voxel_sizes(canonical.affine)


def axial_levels(brain, slices, spacing):
    """`slices` axial indices `spacing` apart, centred on the middle of the brain mask's
    extent along z (RAS), lowest first."""
    levels = np.flatnonzero(brain.any(axis=(0, 1)))
    centre = (levels[0] + levels[-1]) / 2
    return np.floor(centre + (np.arange(slices) - (slices - 1) / 2) * spacing + 0.5).astype(int)


def radiological(plane):
    """A RAS axial plane indexed (x, y) -> an image whose rows run anterior to posterior and
    columns from the subject's right to its left (its left on the image's right)."""
    return plane[::-1, ::-1].T


def fit_to_square(plane, pixel_mm, size, resample):
    """(rows, cols) float plane with pixel sizes (row mm, col mm) -> (size, size) float32:
    the long side resized to `size`, the physical aspect ratio kept, centred on zeros."""
    rows, cols = plane.shape
    scale = size / max(rows * pixel_mm[0], cols * pixel_mm[1])
    new_rows = min(size, max(1, round(rows * pixel_mm[0] * scale)))
    new_cols = min(size, max(1, round(cols * pixel_mm[1] * scale)))
    resized = Image.fromarray(plane.astype(np.float32)).resize((new_cols, new_rows), resample)
    canvas = np.zeros((size, size), np.float32)
    top, left = (size - new_rows) // 2, (size - new_cols) // 2
    canvas[top:top + new_rows, left:left + new_cols] = np.asarray(resized)
    return canvas


def convert_session(pieces, slices, spacing, size):
    """A session's files -> [(axial index, image uint8 (size, size), seg uint8 (size, size))]."""
    image, voxel_mm = read_volume(pieces, "image")
    labels, _ = read_volume(pieces, "seg")
    name = pieces["seg", "img"][0]
    if labels.shape != image.shape:
        raise SkipSession(f"{name} has shape {labels.shape}, its image {image.shape}")
    if not np.isin(labels, (0, 1, 2, 3)).all():
        raise SkipSession(f"{name} holds labels other than 0-3: not an FSL_SEG segmentation")
    brain = labels > 0
    if not brain.any():
        raise SkipSession(f"{name} labels no tissue")
    levels = axial_levels(brain, slices, spacing)
    if levels[0] < 0 or levels[-1] >= image.shape[2]:
        raise SkipSession(f"{slices} slices {spacing} apart (levels {levels[0]}..{levels[-1]}) "
                          f"do not fit in its {image.shape[2]} axial levels: use fewer --slices "
                          f"or a smaller --slice-spacing")
    top = np.percentile(image[brain], 99.5)
    if top <= 0:
        raise SkipSession(f"{pieces['image', 'img'][0]} is black inside the brain")
    pixel_mm = (voxel_mm[1], voxel_mm[0])  # rows run along y, columns along x
    results = []
    for z in levels:
        grey = fit_to_square(radiological(image[:, :, z]) * (255 / top), pixel_mm, size,
                             Image.BICUBIC)
        seg = fit_to_square(radiological(labels[:, :, z]) * 85, pixel_mm, size, Image.NEAREST)
        results.append((int(z), np.clip(np.round(grey), 0, 255).astype(np.uint8),
                        seg.astype(np.uint8)))
    return results


# ---------------------------------------------------------------------------------------------
# Splits and metadata

def subject_hash(seed, subject):
    """A fixed pseudo-random fraction in [0, 1) per (seed, subject), the same on every machine."""
    digest = hashlib.sha256(f"{seed}/{subject}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def subject_places(table, seed, stratify_cdr, path="metadata"):
    """{subject: place in (0, 1)} for the csv's subjects: the rank by subject_hash within its
    group (all, or one per CDR plus one for none), centred and divided by the group's size."""
    groups = {}
    for session in sorted(table):  # a subject's group is its first session's rating
        cdr = table[session].get("CDR", "")
        try:
            group = (f"{float(cdr):g}" if cdr else "none") if stratify_cdr else "all"
        except ValueError:
            raise DataError(f"--metadata {path}: {session} has CDR {cdr!r}, not a number: "
                            f"check that the file is oasis_cross-sectional.csv.") from None
        groups.setdefault(session.rsplit("_MR", 1)[0], group)
    places = {}
    for group in set(groups.values()):
        members = sorted((s for s, g in groups.items() if g == group),
                         key=lambda s: subject_hash(seed, s))
        places.update({s: (rank + 0.5) / len(members) for rank, s in enumerate(members)})
    return places


def split_of(place, percents):
    train, validate = percents[0] / 100, (percents[0] + percents[1]) / 100
    return "train" if place < train else "validate" if place < validate else "test"


def read_metadata(path):
    """oasis_cross-sectional.csv -> (its column names but ID, {session id: {column: value}})."""
    try:
        rows = list(csv.DictReader(io.StringIO(Path(path).read_text(encoding="utf-8-sig"))))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"--metadata {path} cannot be read ({error}).") from None
    rows = [{key.strip(): (value or "").strip() for key, value in row.items() if key}
            for row in rows]
    table = {row.pop("ID"): row for row in rows if SESSION.fullmatch(row.get("ID", ""))}
    if not table or "CDR" not in next(iter(table.values())):
        raise DataError(f"--metadata {path} is not oasis_cross-sectional.csv: expected columns "
                        f"ID (OAS1_xxxx_MRy), M/F, Hand, Age, Educ, SES, MMSE, CDR, eTIV, "
                        f"nWBV, ASF, Delay.")
    return list(next(iter(table.values()))), table


# ---------------------------------------------------------------------------------------------
# Output

def open_output(out, settings):
    """Checks `out` was made by us with `settings`, or creates it with them."""
    marker = out / MARKER
    if marker.is_file():
        try:
            made_with = json.loads(marker.read_text())["settings"]
        except (ValueError, KeyError) as error:
            raise DataError(f"{marker} is damaged ({error}): give a new --out folder.") from None
        changed = [f"{FLAGS[key]} {made_with.get(key)} there, {value} now"
                   for key, value in settings.items() if made_with.get(key) != value]
        if changed:
            raise DataError(f"{out} was made with other settings ({'; '.join(changed)}): run "
                            f"with the same ones to continue it, or give a new --out folder.")
    elif out.is_file() or out.is_dir() and any(  # our marker's temp name: killed writing it
            p.name != f".{MARKER}.partial" for p in out.iterdir()):
        raise DataError(f"--out {out} already holds files that `python dataset.py prepare` did "
                        f"not write (it has no {MARKER}), e.g. the course zip: give an empty or "
                        f"new --out folder.")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(marker, lambda f: json.dump(
            {"written_by": "python dataset.py prepare", "settings": settings}, f, indent=1))


def read_manifest_and_clean(out):
    """The manifest's rows; deletes our files it does not list: a cut-short session's."""
    rows = []
    if (out / MANIFEST).is_file():
        with open(out / MANIFEST, newline="") as file:
            rows = list(csv.DictReader(file))
    listed = {row[key] for row in rows for key in ("image", "seg")}
    for folder in [out / f"keras_png_slices_{kind}{split}" for kind in ("", "seg_")
                   for split in SPLITS]:
        folder.mkdir(exist_ok=True)
        for file in folder.iterdir():  # ours but not in the manifest: a cut-short session's
            if OURS.fullmatch(file.name) and f"{folder.name}/{file.name}" not in listed:
                file.unlink()
    return rows


def write_atomically(path, write, mode="w"):
    """write(file) into a temporary name beside `path`, then rename: never half a file."""
    temp = path.with_name(f".{path.name}.partial")
    with open(temp, mode, **({} if "b" in mode else {"newline": ""})) as file:
        write(file)
    os.replace(temp, path)


def write_session(out, split, case, images, subject, session):
    """PNGs of one session -> its manifest rows (file names relative to `out`)."""
    rows = []
    for index, (z, grey, seg) in enumerate(images):
        names = {"image": f"keras_png_slices_{split}/case_{case:03d}_slice_{index}.nii.png",
                 "seg": f"keras_png_slices_seg_{split}/seg_{case:03d}_slice_{index}.nii.png"}
        for key, array in (("image", grey), ("seg", seg)):
            write_atomically(out / names[key],
                             lambda f, a=array: Image.fromarray(a).save(f, format="PNG"), "wb")
        rows.append({"case": f"{case:03d}", "slice": index, "split": split, "subject": subject,
                     "session": session, "axial_index": z, **names})
    return rows


def write_manifest(out, rows, columns):
    def write(file):
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    write_atomically(out / MANIFEST, write)


def print_summary(out, summary, rows):
    subjects = {s: len({r["subject"] for r in rows if r["split"] == s}) for s in SPLITS}
    print(f"\nconverted {len(summary['converted'])} sessions into {out} "
          f"({len(summary['already_done'])} already done); slices there now: "
          + ", ".join(f"{s} {summary['slices'][s]} ({subjects[s]} subjects)" for s in SPLITS))
    empty = [s for s in SPLITS if not summary["slices"][s]]
    if empty:
        print(f"no slices yet in {', '.join(empty)}: train.py needs train and validate "
              f"(convert more sessions, or change --split in a new --out folder).")
    if summary["skipped"]:
        print(f"skipped sessions ({len(summary['skipped'])}):")
        for session, why in summary["skipped"].items():
            print(f"  {session}: {why}")
