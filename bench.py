"""Measure this machine: how fast our VQ-VAE trains next to the keras.io example's, how much of
the hardware's peak that is, how fast the model reconstructs and encodes, how fast the PixelCNN
prior trains and samples; with --budgets, how good each VQ-VAE gets in a fixed training time.

    python bench.py                                       # the speed table, out/bench.json
    python bench.py --tiny --out /tmp/bench.json          # seconds: 32x32 images, tiny models
    python bench.py --budgets 5,15,30 --train-dir ../shared/data/brain-slices/train \
                    --val-dir ../shared/data/brain-slices/validate

How: every step runs on images already in memory (random pixels; speed does not depend on
them), is traced and run twice before the clock starts, and is timed with time.perf_counter
around calls that return only once the result is ready. Shared machines drift (1.5x within a
run), so models compared are timed in alternating short bursts (ours, reference, ours, ...) and
each ratio is reported as the median and range of its per-burst ratios.

FLOPs come from TensorFlow's profiler (tf.compat.v1.profiler, float_operation) run on the graph
of the traced step: it counts 2 multiply-adds per weight per output position of every
convolution and matmul, forward and backward, plus the elementwise ops it knows. Achieved
FLOP/s = FLOPs / median step time; utilisation = that / the peak measured in this run on a
large matmul and on a 3x3 convolution of our shapes, in the step's compute dtype.

Memory is the peak resident set size of the process so far (CPU; it never goes down, so the
sections run from the lightest up) or the GPU allocator's peak within each section.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import train  # noqa: E402
from reference import ReferenceVQVAE  # noqa: E402
from settings import purpose_config  # noqa: E402

tf.get_logger().setLevel("ERROR")  # the v1 profiler's deprecation notes, retracing notes

TINY = dict(image_size=32, width=8, code_dim=4, codebook_size=16, batch_size=8,
            prior_width=8, prior_layers=2, prior_kernel=3, prior_batch_size=8)
OASIS_TRAIN, OASIS_VALIDATE = 9664, 1120  # slices per epoch of the OASIS keras split


@contextlib.contextmanager
def policy(precision):
    """Models built inside take the dtype policy `precision` (as train.py's do)."""
    keras.mixed_precision.set_global_policy(precision)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def build(kind, config, precision, data_variance=1 / 12):
    """A compiled fresh model in `precision`: ours ('ours', by train.build_model, the one way
    train.py builds it) or the reference ('reference')."""
    with policy(precision):
        if kind == "ours":
            return train.build_model(config, data_variance)
        model = ReferenceVQVAE(data_variance)
        model.build((None, config.image_size, config.image_size, 1))
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate),
                  jit_compile=train.use_xla(config.jit_compile))
    return model


def fit_step(model, batch=None):
    """A callable running the very step fit() runs (with the model's jit_compile) on `batch`,
    or on its argument if no batch is given; it returns once the step is done. The optimizer
    is built first, outside any trace."""
    model.optimizer.build(model.trainable_variables)
    model.make_train_function()
    step = lambda images: float(next(iter(model.train_function([images]).values())))
    return step if batch is None else lambda: step(batch)


def traced(fn, *args):
    """fn traced once for the shapes of `args` -> a callable running it on them that returns
    once the result is ready (it fetches one number of the first output)."""
    concrete = tf.function(fn).get_concrete_function(*map(tf.TensorSpec.from_tensor, args))
    return lambda: np.asarray(tf.nest.flatten(concrete(*args))[0]).ravel()[:1]


def count_flops(fn, *specs):
    """FLOPs of one call of fn on inputs of `specs` (tf.TensorSpec, fully defined), counted by
    TensorFlow's profiler on the traced graph. Conv2D: 2 * H_out * W_out * C_out * k * k * C_in
    per image; its gradients (Conv2DBackpropInput / Filter) the same each."""
    graph = tf.function(fn).get_concrete_function(*specs).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return tf.compat.v1.profiler.profile(graph, options=options).total_float_ops


def alternate(steps, bursts, per_burst):
    """Time the callables in `steps` {name: step} in turns, `per_burst` calls each, `bursts`
    times, after two warm-up calls each -> {name: [median seconds per call of each burst]}."""
    for step in steps.values():
        step(), step()
    medians = {name: [] for name in steps}
    for _ in range(bursts):
        for name, step in steps.items():
            times = []
            for _ in range(per_burst):
                started = time.perf_counter()
                step()
                times.append(time.perf_counter() - started)
            medians[name].append(statistics.median(times))
    return medians


def ratio(times_a, times_b):
    """Per-burst time ratios a/b, i.e. the speed of b over a's: median, min, max."""
    ratios = [a / b for a, b in zip(times_a, times_b)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def memory_mib():
    """Peak memory in MiB: the GPU allocator's peak since the last call, or on CPU the peak
    resident set of the whole process so far (ru_maxrss is in KiB on Linux)."""
    if tf.config.list_physical_devices("GPU"):
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
        tf.config.experimental.reset_memory_stats("GPU:0")
        return peak / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_flops(dtype, tiny):
    """GFLOP/s of a large matmul (n x n by n x n: 2 n^3 FLOPs) and of a 3x3 convolution of our
    shapes (B x 128 x 128 x 64 -> 64 at 256 px: 2 * B*128*128 * 64 * 9 * 64 FLOPs)."""
    n, (b, s, c) = (256, (2, 32, 16)) if tiny else (2048, (32, 128, 64))
    a = tf.cast(tf.random.normal((n, n)), dtype)
    x = tf.cast(tf.random.normal((b, s, s, c)), dtype)
    w = tf.cast(tf.random.normal((3, 3, c, c)), dtype)
    work = {"matmul": (lambda: tf.matmul(a, a), 2 * n**3),
            "conv3x3": (lambda: tf.nn.conv2d(x, w, 1, "SAME"), 2 * b * s * s * c * 9 * c)}
    times = alternate({name: traced(f) for name, (f, _) in work.items()}, 3, 3 if tiny else 10)
    return {name: flops / min(times[name]) / 1e9 for name, (_, flops) in work.items()}


COMPUTE_DTYPE = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}


def bench_training(config, precisions, batch, peaks, bursts, per_burst):
    """Training steps of ours and the reference in each precision, in alternating bursts."""
    results, steps, flops = {}, {}, {}
    for precision in precisions:
        for kind in ("ours", "reference"):
            model = build(kind, config, precision)
            steps[kind, precision] = fit_step(model, batch)
            flops[kind, precision] = count_flops(model.train_step,
                                                 tf.TensorSpec.from_tensor(batch))
    times = alternate(steps, bursts, per_burst)
    for (kind, precision), medians in times.items():
        seconds, per_image = statistics.median(medians), flops[kind, precision] / len(batch)
        achieved = flops[kind, precision] / seconds / 1e9
        peak = peaks[COMPUTE_DTYPE[precision]]
        results[f"{kind} {precision}"] = {
            "images_per_s": len(batch) / seconds, "ms_per_step": 1000 * seconds,
            "burst_ms": [1000 * m for m in medians], "gflop_per_image": per_image / 1e9,
            "achieved_gflop_per_s": achieved,
            "utilisation_of_conv_peak_pct": 100 * achieved / peak["conv3x3"],
            "utilisation_of_matmul_peak_pct": 100 * achieved / peak["matmul"]}
    ratios = {p: ratio(times["reference", p], times["ours", p]) for p in precisions}
    return results, ratios


def bench_jit(config, precision, batch, bursts, per_burst):
    """Our training step with XLA on and off, alternating: what backs --jit-compile auto."""
    steps = {}
    for choice in ("off", "on"):
        model = build("ours", dataclasses.replace(config, jit_compile=choice), precision)
        steps[choice] = fit_step(model, batch)
    times = alternate(steps, bursts, per_burst)
    return {f"jit_{choice}_images_per_s": len(batch) / statistics.median(times[choice])
            for choice in times} | {"on_over_off_speed": ratio(times["off"], times["on"])}


def bench_inference(config, precision, batch, bursts, per_burst):
    """Reconstruction (ours and reference), encoding to codes, and the validation step with
    SSIM/PSNR that fit() runs after each epoch (ours), in images/s."""
    ours, reference = build("ours", config, precision), build("reference", config, precision)
    ours.make_test_function()
    steps = {"reconstruct": traced(ours, batch), "reference_reconstruct": traced(reference, batch),
             "encode": traced(ours.encode, batch),
             "validate": lambda: float(ours.test_function([batch])["ssim"])}
    times = alternate(steps, bursts, per_burst)
    return {name: len(batch) / statistics.median(t) for name, t in times.items()}


def bench_prior(config, precision, bursts, per_burst):
    """Prior training steps at the config's grid, in code maps/s."""
    grid = config.image_size // config.downsample
    with policy(precision):
        prior = train.build_prior(config, grid, config.codebook_size)
    codes = tf.random.uniform((config.prior_batch_size, grid, grid), 0, config.codebook_size,
                              tf.int32)
    times = alternate({"prior": fit_step(prior, codes)}, bursts, per_burst)["prior"]
    return {"grid": grid, "code_maps_per_s": len(codes) / statistics.median(times)}


def bench_sampling(config, precision, count, downsample):
    """Draw `count` code maps with the prior's sampler (traced before the clock starts; the
    first call's graph optimisation, under a second, is timed) and decode them with a VQ-VAE
    of the matching grid -> new slices/s, sampling and decoding. One call: at 64x64 a call
    takes minutes on a CPU."""
    grid = config.image_size // downsample
    with policy(precision):
        prior = train.build_prior(config, grid, config.codebook_size)
        vqvae = train.build_model(dataclasses.replace(config, downsample=downsample), 1 / 12)
    draw = prior.sampler(count, 1.0, 0)
    vqvae.decode_all(np.zeros((1, grid, grid), "int32"))  # decoding traced once too
    started = time.perf_counter()
    codes = draw().numpy()
    sampled = time.perf_counter()
    vqvae.decode_all(codes)
    done = time.perf_counter()
    return {"grid": grid, "count": count, "sample_s": sampled - started,
            "decode_s": done - sampled, "slices_per_s": count / (done - started)}


def environment(config, precision, tiny):
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        device = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                 if line.startswith("model name")]
        device = f"CPU: {names[0] if names else 'unknown'}"
    return {"device": device, "tensorflow": tf.__version__, "keras": keras.__version__,
            "precision_auto": precision, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "batch_size": config.batch_size, "prior_batch_size": config.prior_batch_size,
            "image_size": config.image_size, "tiny": tiny,
            "flop_method": "tf.compat.v1.profiler float_operation on the traced train_step "
                           "graph (forward, backward and optimizer ops)",
            "memory": "GPU allocator peak per section" if gpus else
                      "peak RSS of the process so far (ru_maxrss), sections in run order"}


def validation_share(training, inference, precision):
    """Validation's share of an OASIS epoch (9,664 train, 1,120 validation slices) from the
    measured training and validation-step speeds of our model."""
    train_s = OASIS_TRAIN / training[f"ours {precision}"]["images_per_s"]
    val_s = OASIS_VALIDATE / inference["validate"]
    return {"train_s": train_s, "validate_s": val_s, "share_pct": 100 * val_s / (train_s + val_s)}


def table(results):
    """The results as aligned text lines."""
    env, lines = results["environment"], []
    lines.append(f"{env['device']} | TF {env['tensorflow']}, Keras {env['keras']} | "
                 f"{env['cpus_usable']} CPUs | batch {env['batch_size']} at "
                 f"{env['image_size']}px | auto precision: {env['precision_auto']}")
    for dtype, peak in results["peak_gflop_per_s"].items():
        lines.append(f"peak {dtype:9s} matmul {peak['matmul']:8.1f} GFLOP/s   3x3 conv "
                     f"{peak['conv3x3']:8.1f} GFLOP/s")
    lines.append(f"{'training step':26s} {'images/s':>9s} {'ms/step':>9s} {'GFLOP/img':>10s} "
                 f"{'GFLOP/s':>9s} {'% conv pk':>9s}")
    for name, r in results["training"].items():
        lines.append(f"{name:26s} {r['images_per_s']:9.1f} {r['ms_per_step']:9.1f} "
                     f"{r['gflop_per_image']:10.3f} {r['achieved_gflop_per_s']:9.1f} "
                     f"{r['utilisation_of_conv_peak_pct']:9.1f}")
    spread = lambda r: f"{r['median']:.2f} (bursts {r['min']:.2f}-{r['max']:.2f})"
    for precision, r in results["ours_over_reference_speed"].items():
        lines.append(f"ours/reference speed, {precision}: {spread(r)}")
    jit = results["jit_compile"]
    lines.append(f"XLA on/off speed ({jit['precision']}): {spread(jit['on_over_off_speed'])}; "
                 f"on {jit['jit_on_images_per_s']:.1f}, off {jit['jit_off_images_per_s']:.1f} "
                 f"images/s")
    for name, value in results["inference_images_per_s"].items():
        lines.append(f"{name:26s} {value:9.1f} images/s")
    share = results["validation_share"]
    lines.append(f"validation share of an OASIS epoch: {share['share_pct']:.1f}% "
                 f"({share['validate_s']:.1f} s of {share['train_s'] + share['validate_s']:.1f} s)")
    prior = results["prior_training"]
    lines.append(f"prior training, {prior['grid']}x{prior['grid']}: "
                 f"{prior['code_maps_per_s']:.1f} code maps/s in batches of "
                 f"{env['prior_batch_size']}")
    for s in results["sampling"]:
        lines.append(f"sampling {s['count']:3d} at {s['grid']}x{s['grid']}: "
                     f"{s['slices_per_s']:.2f} slices/s ({s['sample_s']:.1f} s sampling, "
                     f"{s['decode_s']:.2f} s decoding)")
    lines.append("peak memory (MiB): " + ", ".join(f"{k} {v:.0f}"
                                                  for k, v in results["memory_mib"].items()))
    quality = results.get("time_to_quality", {})
    for kind in ("ours", "reference") if quality else ():
        for s in quality[kind]:
            lines.append(f"{kind:9s} {s['minutes']:6.1f} min, {s['images_seen']:7d} images: "
                         f"SSIM {s['ssim']:.4f}, PSNR {s['psnr_db']:.2f} dB")
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/bench.json", help="the JSON file written")
    parser.add_argument("--tiny", action="store_true",
                        help="32x32 images, tiny models, few steps: seconds (for the tests)")
    parser.add_argument("--sample-counts", default="16",
                        help="code maps drawn at once, comma-separated (0: no sampling). "
                             "Default 16: on 2 CPU cores 16 at 64x64 take ~10 s, so 256 "
                             "there would take minutes")
    parser.add_argument("--budgets", default="",
                        help="minutes of training, comma-separated (e.g. 5,15,30): time to "
                             "quality of ours and the reference; needs --train-dir, --val-dir")
    parser.add_argument("--train-dir", default="", help="training slices for --budgets")
    parser.add_argument("--val-dir", default="", help="validation slices for --budgets")
    args = parser.parse_args(argv)
    numbers = lambda text, kind: [kind(v) for v in text.split(",") if v.strip()]
    args.sample_counts = [n for n in numbers(args.sample_counts, int) if n > 0]
    args.budgets = numbers(args.budgets, float)
    if args.budgets and not (args.train_dir and args.val_dir):
        parser.error("--budgets needs --train-dir and --val-dir")
    return args


def main(argv=None):
    args = parse_args(argv)
    # the 64x64-grid model of --purpose reconstruct: the one the FLOP figures and study.py study
    config = purpose_config("reconstruct", **(TINY if args.tiny else {}))
    bursts, per_burst = (2, 2) if args.tiny else (5, 3)
    precision = train.choose_precision("auto")
    precisions = ["float32"] + ([precision] if precision != "float32" else [])
    keras.utils.set_random_seed(config.seed)
    batch = tf.random.uniform((config.batch_size, config.image_size, config.image_size, 1))
    results, memory = {"environment": environment(config, precision, args.tiny)}, {}
    memory_mib()  # GPU: start the first section's peak here

    def section(name, result):
        memory[name] = memory_mib()
        print(f"done: {name}", flush=True)
        return result

    results["peak_gflop_per_s"] = section("peaks", {
        COMPUTE_DTYPE[p]: peak_flops(COMPUTE_DTYPE[p], args.tiny) for p in precisions})
    results["inference_images_per_s"] = section("inference", bench_inference(
        config, precision, batch, bursts, per_burst))
    results["training"], results["ours_over_reference_speed"] = section(
        "training", bench_training(config, precisions, batch, results["peak_gflop_per_s"],
                                   bursts, per_burst))
    results["jit_compile"] = section("jit_compile", {"precision": precision, **bench_jit(
        config, precision, batch, 3 if not args.tiny else 2, 2)})
    results["validation_share"] = validation_share(results["training"],
                                                   results["inference_images_per_s"], precision)
    results["prior_training"] = section("prior_training", bench_prior(
        config, precision, bursts, per_burst))
    results["sampling"] = section("sampling", [
        bench_sampling(config, precision, count, downsample)
        for downsample in (8, 4) for count in args.sample_counts])
    if args.budgets:
        import study  # training to a quality is study.py's part; it imports this file
        results["time_to_quality"] = section("time_to_quality", study.time_to_quality(
            config, args.budgets, args.train_dir, args.val_dir))
    results["memory_mib"] = memory
    print("\n".join(table(results)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
