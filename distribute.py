"""Training on several GPUs and several machines with tf.distribute: which strategy, which worker
this process is, its share of the data, and where it may write.

    --strategy auto         multiworker if TF_CONFIG names more than one worker, mirrored if
                            this machine sees more than one GPU, else default (one device)
    --strategy mirrored     MirroredStrategy: every GPU of this machine, one replica each
    --strategy multiworker  MultiWorkerMirroredStrategy over the machines listed in TF_CONFIG

Every replica holds the same weights: gradients are summed across replicas (the models'
train_step divide their loss by the number of replicas, so that sum is the gradient of the mean
over the global batch), and the quantizer all-reduces its codebook statistics (modules.py;
the helpers for that, used inside a step, come first below). --batch-size is the global batch,
split evenly across replicas; the learning rate is not rescaled, so on one machine a run on 2
GPUs takes the same steps on the same global batches as a run on one device (less the last
partial batch of each epoch, which training under a strategy leaves out).

On several machines (the multi-worker guide's rules): the same command runs on every worker,
each with its own TF_CONFIG; only the chief writes --out. The other workers write to temporary
folders that are removed at the end, and read the run they continue from --out, which must
therefore be on a file system all of them see. Each worker trains on its own share of the
slices (and of the code maps), which it alone decodes; every worker gets the same number (up to
workers - 1 are left out per split), because all of them must run the same number of steps.
"""

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import tensorflow as tf

# what a worker needs of the run it continues; its logs, plots and frames are its own
RUN_FILES = ("config.json", "state.json", "last.keras", "best.keras", "prior_state.json",
             "prior_last.keras", "prior_best.keras")


# ---------------------------------------------------------------------------------------------
# Inside a step (replica context): what keeps the replicas identical

def replica_context():
    """The tf.distribute replica context when a step runs on several replicas, else None."""
    context = tf.distribute.get_replica_context()
    return context if context is not None and context.num_replicas_in_sync > 1 else None


def sum_over_replicas(x):
    """x summed over every replica of a tf.distribute strategy (an all-reduce); x itself on one
    device. Statistics that must be the same everywhere (EMA counts and sums, code histograms)
    are summed before they are used, so every replica computes the same update."""
    context = replica_context()
    return x if context is None else context.all_reduce(tf.distribute.ReduceOp.SUM, x)


def results_over_replicas(trackers):
    """{name: result} of keras.metrics.Mean trackers over the whole global batch, the same on
    every replica (each replica holds only its part of a tracker's total and count; Keras sums
    the parts only when it reads them at the end of an epoch): one all-reduce per step.

    On several workers each result is shaped (1,): Keras 3.15 reduces the outputs of a
    multi-worker step with strategy.reduce(MEAN, axis=0), which fails on a scalar.
    """
    context = replica_context()
    if context is None:
        return {tracker.name: tracker.result() for tracker in trackers}
    parts = tf.stack([tf.identity(v.value) for t in trackers for v in (t.total, t.count)])
    sums = context.all_reduce(tf.distribute.ReduceOp.SUM, parts)
    means = tf.math.divide_no_nan(sums[0::2], sums[1::2])  # total / count of each tracker
    several_workers = (isinstance(tf.distribute.get_strategy(),
                                  tf.distribute.MultiWorkerMirroredStrategy)
                       and this_worker().count > 1)
    return {tracker.name: means[i:i + 1] if several_workers else means[i]
            for i, tracker in enumerate(trackers)}


def never_empty(batch):
    """batch (B, ...) -> (batch, B), with one all-zero element in place of an empty batch:
    a replica may be handed none of the last, partial batch of a validation split, and
    TensorFlow's CPU convolutions fail on an empty batch. The step evaluates the filler and
    records nothing for it (count 0); every collective still runs on every replica."""
    count = tf.shape(batch)[0]
    filler = tf.zeros(tf.concat([[1], tf.shape(batch)[1:]], axis=0), batch.dtype)
    return tf.cond(count > 0, lambda: batch, lambda: filler), count


def scale_for_replicas(loss):
    """loss / replicas: the optimizer sums the replicas' gradients, so that sum is then the
    gradient of the loss over the whole global batch."""
    return loss / tf.distribute.get_strategy().num_replicas_in_sync


# ---------------------------------------------------------------------------------------------
# Around training: the strategy, this worker, its data and its output folder

def this_worker():
    """SimpleNamespace(count, index, chief) from TF_CONFIG; one chief worker without it.

    The chief is the task of type "chief", or worker 0 when the cluster has no "chief" entry.
    """
    raw = os.environ.get("TF_CONFIG", "")
    if not raw.strip():
        return SimpleNamespace(count=1, index=0, chief=True)
    try:
        config = json.loads(raw)
        cluster, kind, index = config["cluster"], config["task"]["type"], config["task"]["index"]
        count = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
        known = kind in ("chief", "worker") and 0 <= int(index) < len(cluster[kind])
    except (ValueError, KeyError, TypeError, AttributeError):
        known = False
    if not known:
        sys.exit(f"error: TF_CONFIG is not a cluster this train.py can join: {raw!r}. It needs "
                 f"'cluster' (lists of 'host:port' under 'worker', and optionally 'chief') and "
                 f"'task' ({{'type': 'worker' or 'chief', 'index': its place in that list}}); "
                 f"see the README's multi-machine section.")
    chief = kind == "chief" or (kind == "worker" and int(index) == 0 and "chief" not in cluster)
    return SimpleNamespace(count=count, index=int(index), chief=chief)


def choose_strategy(choice, worker):
    """The tf.distribute strategy for --strategy. Create it before any other TensorFlow work:
    MultiWorkerMirroredStrategy must configure the collective ops at program start."""
    gpus = len(tf.config.list_physical_devices("GPU"))
    if choice == "auto":
        choice = "multiworker" if worker.count > 1 else "mirrored" if gpus > 1 else "default"
    if worker.count > 1 and choice != "multiworker":
        sys.exit(f"error: TF_CONFIG describes a cluster of {worker.count} workers, but "
                 f"--strategy {choice} trains on this machine alone: use --strategy "
                 f"multiworker (or auto), or unset TF_CONFIG.")
    if choice == "mirrored":
        return tf.distribute.MirroredStrategy()
    if choice == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def check_batch_sizes(strategy, sizes):
    """sizes {flag: global batch}: each must split evenly across the replicas."""
    replicas = strategy.num_replicas_in_sync
    for flag, size in sizes.items():
        if size % replicas:
            sys.exit(f"error: {flag} {size} is the global batch and must split evenly across "
                     f"the {replicas} replicas: give a multiple of {replicas}, or (a resumed "
                     f"run keeps its batch sizes) train on fewer devices: --strategy default, "
                     f"or choose GPUs with CUDA_VISIBLE_DEVICES.")


def all_workers_agree(strategy, flag):
    """True on every worker if `flag` is True on any of them (a collective every worker must
    call at the same point): a time limit or a stop signal ends the run on all workers at the
    same epoch, or one of them would wait forever for the others' gradients."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return flag
    votes = strategy.run(lambda: tf.constant(1.0 if flag else 0.0))
    return bool(strategy.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None) > 0)


def stop_agreement(strategy):
    """For StopOnSignal on a cluster: a function flag -> all_workers_agree(strategy, flag);
    None on one machine, where every replica stops together anyway."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    return lambda flag: all_workers_agree(strategy, flag)


def refuse_a_second_run(out):
    """A new run must not start in a folder that holds one."""
    if (Path(out) / "state.json").exists() or (Path(out) / "last.keras").exists():
        sys.exit(f"error: {out} already holds a training run: continue it with --resume, or "
                 f"give a new --out folder (or delete {out}) to start another.")


@contextlib.contextmanager
def writable_out(out, worker, strategy, continuing):
    """The folder this process writes: `out` on the chief; on any other worker a temporary
    folder, removed on exit, which starts as a copy of the run's files in `out` when the run
    continues. Every worker then follows the same steps on the same state, and only the chief's
    files remain. The copy is made between two barriers: after the chief has finished what a
    killed run was saving (parse_args), before it changes anything for this run.

    A new run in an `out` that holds one is refused on every worker here, before the first
    collective, so that none is left waiting for a chief that stopped."""
    if not continuing:
        refuse_a_second_run(out)
    if worker.chief:
        all_workers_agree(strategy, False)  # barrier: the others copy now
        all_workers_agree(strategy, False)  # barrier: they have copied
        yield out
        return
    scratch = Path(tempfile.mkdtemp(prefix=f"vqvae-worker{worker.index}-"))
    try:
        all_workers_agree(strategy, False)
        for name in RUN_FILES if continuing else ():
            if (Path(out) / name).exists():
                shutil.copyfile(Path(out) / name, scratch / name)
        all_workers_agree(strategy, False)
        yield str(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def share_of(items, workers, index):
    """Worker `index`'s items: every workers-th one, all shares of the same length (equal
    steps on every worker), so up to workers - 1 items are left out."""
    return items[index::workers][:len(items) // workers]


def batches(strategy, items, global_batch, make, training=False):
    """(dataset, steps per epoch) for fit(), from make(items, batch_size, drop_remainder) -> a
    tf.data.Dataset of batches. steps is None where fit() can count the batches itself.

    On one machine that is make(items, global_batch, ...), and the strategy splits every global
    batch evenly across the replicas. Training under a strategy drops the last partial batch,
    so that no replica is ever handed nothing to train on.

    On several workers each one makes only its own share of the items (workers see different
    slices, and decode only theirs) in per-replica batches, which its replicas take in turn.
    fit() would count those batches as steps, so the training steps are given, and the
    training dataset repeats (fit() keeps one iterator over all epochs when given the steps).
    """
    if strategy.num_replicas_in_sync == 1:
        return make(items, global_batch, False), None
    workers = this_worker().count
    steps = len(share_of(items, workers, 0)) // (global_batch // workers)
    if training and steps == 0:
        sys.exit(f"error: a global batch of {global_batch} is more than the {len(items)} "
                 f"items to train on, and under a tf.distribute strategy training takes whole "
                 f"batches only: lower --batch-size (or --prior-batch-size for the prior).")
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or workers == 1:
        return make(items, global_batch, training), None

    def for_worker(context):
        share = share_of(items, context.num_input_pipelines, context.input_pipeline_id)
        dataset = make(share, context.get_per_replica_batch_size(global_batch), training)
        local_replicas = context.num_replicas_in_sync // context.num_input_pipelines
        return dataset.take(steps * local_replicas).repeat() if training else dataset

    return strategy.distribute_datasets_from_function(for_worker), steps if training else None
