"""distribute.py and training under tf.distribute: replicas in lockstep (weights, codebooks, EMA
statistics, restarts) on two logical CPUs (conftest.py), train.py end to end under a
MirroredStrategy, and two train.py worker processes under MultiWorkerMirroredStrategy."""

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import distribute
import modules
import predict
import train
from conftest import TINY
from prior import PixelCNNPrior

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_replicas():
    """One strategy for every test: strategies created side by side in one process can mix up
    the keys of their collective operations."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def tiny_vqvae(optimizer=None, dead_code_steps=2):
    keras.utils.set_random_seed(0)
    model = modules.VQVAE(image_size=16, downsample=4, width=8, res_blocks=0, code_dim=4,
                          codebook_size=16, dead_code_steps=dead_code_steps, seed=0)
    model.compile(optimizer=optimizer or keras.optimizers.Adam(1e-2), jit_compile=False)
    return model


def images(count, seed=0):
    """Smooth random images (count, 16, 16, 1): neighbouring codes differ, as in real slices."""
    noise = np.random.default_rng(seed).random((count, 4, 4, 1)).astype("float32")
    return tf.image.resize(noise, (16, 16)).numpy()


def on_each_replica(strategy, variable):
    """The values (numpy) a variable holds on each replica."""
    return [np.asarray(v) for v in strategy.experimental_local_results(variable.value)]


def test_replicas_hold_identical_weights_and_codebooks_after_training(two_replicas):
    """Without the all-reduce each replica moves its codebook towards its own half of the
    batch and restarts codes from its own vectors, and the copies drift apart."""
    strategy = two_replicas
    with strategy.scope():
        model = tiny_vqvae(dead_code_steps=1000)  # few restarts, which would hide the drift
    model.fit(tf.data.Dataset.from_tensor_slices(images(48)).batch(8), epochs=2, verbose=0)
    for variable in model.weights:
        first, second = on_each_replica(strategy, variable)
        np.testing.assert_array_equal(first, second, err_msg=variable.path)


def test_one_step_on_two_replicas_equals_one_step_on_one_device(two_replicas):
    """Same initial weights, same global batch of 8 (4 per replica): the EMA counts and sums,
    the dead-code counters, the logged statistics and, with plain SGD (whose step, unlike
    Adam's, shows a gradient twice too large), the weights, all equal a single-device step."""
    batch = images(8)
    single = tiny_vqvae(keras.optimizers.SGD(0.5))
    chosen = np.bincount(single.encode(batch).numpy().ravel(), minlength=16) > 0
    strategy = two_replicas
    with strategy.scope():
        mirrored = tiny_vqvae(keras.optimizers.SGD(0.5))
    data = tf.data.Dataset.from_tensors(batch)
    # validation before the step (after it, the restarted codes differ: drawn at random)
    logs = [{**{"val_" + name: value
                for name, value in model.evaluate(data, verbose=0, return_dict=True).items()},
             **{name: value[0] for name, value in model.fit(data, verbose=0).history.items()}}
            for model in (single, mirrored)]
    assert set(logs[0]) == set(logs[1]) and len(logs[0]) == 12  # training and validation
    for name, value in logs[0].items():
        np.testing.assert_allclose(logs[1][name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    q1, q2 = single.quantizer, mirrored.quantizer
    np.testing.assert_allclose(q2.ema_count.numpy(), q1.ema_count.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(q2.steps_unused.numpy(), q1.steps_unused.numpy())
    np.testing.assert_allclose(q2.ema_sum.numpy()[chosen], q1.ema_sum.numpy()[chosen],
                               rtol=1e-5, atol=1e-6)  # the others were restarted, at random
    for a, b in zip(single.encoder.weights + single.decoder.weights,
                    mirrored.encoder.weights + mirrored.decoder.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-6, err_msg=a.path)


def test_validation_with_a_replica_handed_nothing_equals_one_device(two_replicas):
    """9 slices in batches of 8: the last batch gives one replica 1 slice and the other none
    (TensorFlow's CPU convolutions fail on an empty batch). Every value must still equal the
    single-device one: the mean over the 9 slices, not over per-replica means."""
    data = tf.data.Dataset.from_tensor_slices(images(9, seed=5)).batch(8)
    single = tiny_vqvae()
    with two_replicas.scope():
        mirrored = tiny_vqvae()
    results = [model.evaluate(data, verbose=0, return_dict=True) for model in (single, mirrored)]
    assert len(results[0]) == 7
    for name, value in results[0].items():
        np.testing.assert_allclose(results[1][name], value, rtol=1e-5, err_msg=name)


def test_a_restart_picks_the_same_batch_vectors_on_every_replica(two_replicas):
    """The first step restarts every code no vector chose: each replica's new code vector is
    the same, and it is one of the encoder outputs of the global batch."""
    batch = images(8, seed=3)
    z_e = tiny_vqvae().encoder(batch).numpy().reshape(-1, 4)  # the same initial weights
    strategy = two_replicas
    with strategy.scope():
        model = tiny_vqvae(dead_code_steps=1000)
    chosen = np.bincount(model.encode(batch).numpy().ravel(), minlength=16) > 0
    assert not chosen.all()  # some codes are restarted
    model.fit(tf.data.Dataset.from_tensors(batch), verbose=0)
    first, second = on_each_replica(strategy, model.quantizer.codebook)
    np.testing.assert_array_equal(first, second)
    for vector in first[~chosen]:
        assert np.abs(z_e - vector).max(axis=1).min() < 1e-5


def test_a_prior_step_on_two_replicas_equals_one_on_one_device(two_replicas):
    codes = np.random.default_rng(4).integers(0, 10, (8, 6, 6)).astype("int32")
    data = tf.data.Dataset.from_tensors(codes)

    def tiny_prior():
        keras.utils.set_random_seed(0)
        prior = PixelCNNPrior(grid_size=6, codebook_size=10, width=8, layers=2, kernel_size=3,
                              position_dim=4)
        prior.compile(optimizer=keras.optimizers.SGD(0.5), jit_compile=False)
        return prior

    single = tiny_prior()
    with two_replicas.scope():
        mirrored = tiny_prior()
    odd = tf.data.Dataset.from_tensor_slices(codes[:5]).batch(4)  # a replica gets none of 1
    logs = [{"val": prior.evaluate(odd, verbose=0), **prior.fit(data, verbose=0).history}
            for prior in (single, mirrored)]
    for name in ("bits_per_code", "val"):
        np.testing.assert_allclose(logs[1][name], logs[0][name], rtol=1e-5, err_msg=name)
    for a, b in zip(single.weights, mirrored.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-6, err_msg=a.path)


def test_a_prior_with_dropout_trains_on_two_replicas(two_replicas):
    """Dropout's masks are random, so no step equals one on one device; it must still run
    under the strategy, learn, and leave the replicas' weights alike."""
    codes = np.tile(np.arange(6, dtype="int32")[None, :, None], (8, 1, 6))  # rows count up
    with two_replicas.scope():
        keras.utils.set_random_seed(0)
        prior = PixelCNNPrior(grid_size=6, codebook_size=10, width=8, layers=2, kernel_size=3,
                              position_dim=4, dropout=0.5)
        prior.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
    bits = prior.fit(tf.data.Dataset.from_tensors(codes).repeat(20), verbose=0).history
    assert np.isfinite(bits["bits_per_code"][0]) and prior.evaluate(codes, verbose=0) < 2.0
    first, second = on_each_replica(two_replicas, prior.blocks[1].h_out.kernel)
    np.testing.assert_array_equal(first, second)


def test_tf_config_says_which_worker_this_is(monkeypatch):
    cluster = {"worker": ["a:1", "b:2"]}
    for task, expected in [({"type": "worker", "index": 0}, (2, 0, True)),
                           ({"type": "worker", "index": 1}, (2, 1, False))]:
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
        worker = distribute.this_worker()
        assert (worker.count, worker.index, worker.chief) == expected
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {**cluster, "chief": ["c:3"]},
                                                "task": {"type": "worker", "index": 0}}))
    assert not distribute.this_worker().chief  # with a "chief" entry, worker 0 is not it
    monkeypatch.delenv("TF_CONFIG")
    assert distribute.this_worker().chief


@pytest.mark.parametrize("tf_config", ["{not json", json.dumps({"cluster": {"worker": ["a:1"]}}),
                                       json.dumps({"cluster": {"worker": ["a:1"]},
                                                   "task": {"type": "worker", "index": 3}})])
def test_a_broken_tf_config_is_refused_with_what_it_needs(tf_config, monkeypatch, capsys):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(SystemExit, match="TF_CONFIG is not a cluster .* needs 'cluster'"):
        distribute.this_worker()


def test_a_cluster_with_a_one_machine_strategy_is_refused(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]},
                                                "task": {"type": "worker", "index": 0}}))
    with pytest.raises(SystemExit, match="--strategy mirrored trains on this machine alone"):
        distribute.choose_strategy("mirrored", distribute.this_worker())


def test_a_global_batch_that_does_not_split_across_replicas_is_refused(two_replicas):
    with pytest.raises(SystemExit, match="--batch-size 7 is the global batch .* multiple of 2"):
        distribute.check_batch_sizes(two_replicas, {"--batch-size": 7})


def test_each_worker_gets_an_equal_share_of_different_items():
    items = np.arange(11)
    shares = [distribute.share_of(items, 3, index) for index in range(3)]
    assert [len(share) for share in shares] == [3, 3, 3]
    together = np.concatenate(shares)
    assert len(set(together)) == 9  # disjoint; 11 % 3 = 2 items left out


def test_train_py_under_a_mirrored_strategy_resumes_and_predicts(oasis_root, tmp_path,
                                                                 monkeypatch, two_replicas):
    """Both stages, a resumed epoch and predict.py on one device, with two replicas."""
    strategy = two_replicas
    monkeypatch.setattr(distribute, "choose_strategy", lambda choice, worker: strategy)
    out = tmp_path / "out"
    train.main(["--data", str(oasis_root), "--epochs", "1", "--out", str(out), *TINY,
                "--prior-epochs", "1", "--prior-batch-size", "8"])
    train.main(["--resume", "--epochs", "2", "--prior-epochs", "2", "--out", str(out)])
    assert json.loads((out / "state.json").read_text())["epochs_done"] == 2
    assert json.loads((out / "prior_state.json").read_text())["epochs_done"] == 2
    model = keras.models.load_model(out / "last.keras")  # saved from replica 0, loads anywhere
    assert model.optimizer.iterations.numpy() == 2 * (24 // 8)  # whole global batches only
    predict.main(["--checkpoint", str(out), "--out", str(tmp_path / "report")])
    assert json.loads((tmp_path / "report" / "report.json").read_text())["ssim"]["mean"] > 0
    predict.main(["--checkpoint", str(out), "--out", str(tmp_path / "new"), "--generate", "2",
                  "--no-metrics"])
    assert (tmp_path / "new" / "sample_001.png").exists()


# ---------------------------------------------------------------------------------------------
# two train.py processes on 127.0.0.1, one TF_CONFIG each

WORKER = """
import os, sys
import numpy as np
sys.path.insert(0, {repo!r})
import train

fit = train.fit

def fit_and_keep_weights(model, *args, **kwargs):  # what this worker ends with, for the test
    fit(model, *args, **kwargs)
    np.savez(os.path.join(os.environ["WEIGHTS_DIR"], type(model).__name__ + ".npz"),
             *[np.asarray(weight) for weight in model.weights])

train.fit = fit_and_keep_weights
train.main(sys.argv[1:])
"""


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(tmp_path, args, crash_at=None):
    """Two worker processes running the same train.py command, their output in files (a full
    pipe could stall one, and with it both); worker 1 kills itself at `crash_at`
    (monitor.crash_point) if given."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=str(REPO)))
    hosts = [f"127.0.0.1:{port}" for port in free_ports(2)]
    workers = []
    for index in range(2):
        folder = tmp_path / f"worker{index}"
        (folder / "tmp").mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TMPDIR": str(folder / "tmp"), "WEIGHTS_DIR": str(folder),
               "TF_CONFIG": json.dumps({"cluster": {"worker": hosts},
                                        "task": {"type": "worker", "index": index}})}
        env.pop("VQVAE_CRASH_AT", None)
        if crash_at and index == 1:
            env["VQVAE_CRASH_AT"] = crash_at
        with open(folder / "output.txt", "w") as output:
            workers.append(subprocess.Popen([sys.executable, str(script), *args], cwd=tmp_path,
                                            env=env, stdout=output, stderr=subprocess.STDOUT))
        workers[-1].output = folder / "output.txt"
    return workers


def finish(workers, timeout=300):
    """Wait for every worker, all within `timeout` seconds, else kill them all (a hang must
    fail the test, never stall CI) -> [(exit code, output)]."""
    deadline = time.monotonic() + timeout
    try:
        for worker in workers:
            worker.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the workers ran past {timeout} s:\n"
                    + "\n".join(w.output.read_text()[-2000:] for w in workers))
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
    return [(worker.returncode, worker.output.read_text()) for worker in workers]


def assert_workers_agree(tmp_path):
    """Both workers ended with the same weights, codebooks and prior; the one that is not the
    chief left nothing behind in its temporary folder."""
    for name in ("VQVAE.npz", "PixelCNNPrior.npz"):
        chief, other = (np.load(tmp_path / f"worker{i}" / name) for i in range(2))
        assert len(chief.files) == len(other.files) > 0
        for key in chief.files:
            np.testing.assert_array_equal(chief[key], other[key], err_msg=f"{name} {key}")
    assert not list((tmp_path / "worker1" / "tmp").glob("vqvae-worker*"))


def multiworker_command(oasis_root, out):
    return ["--data", str(oasis_root), "--out", str(out), *TINY, "--epochs", "2",
            "--prior-epochs", "1", "--prior-batch-size", "8", "--strategy", "multiworker"]


def test_two_workers_train_in_lockstep_and_only_the_chief_writes(oasis_root, tmp_path):
    out = tmp_path / "out"
    for code, output in finish(start_workers(tmp_path, multiworker_command(oasis_root, out))):
        assert code == 0, output[-3000:]
    assert_workers_agree(tmp_path)
    with open(out / "training_log.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1"]  # one writer
    assert json.loads((out / "config.json").read_text())["train"]["out"] == str(out)
    report = tmp_path / "report"
    predict.main(["--checkpoint", str(out), "--out", str(report)])  # on one device
    assert json.loads((report / "report.json").read_text())["ssim"]["mean"] > 0


def test_a_cluster_restarted_after_a_worker_died_resumes_in_lockstep(oasis_root, tmp_path):
    """Worker 1 dies in the first step of epoch 2 (3 steps per epoch; that step's all-reduce
    means the chief had committed epoch 1); the chief is then stopped, as a cluster manager
    restarts the whole job, and both resume from the chief's epoch 1."""
    out = tmp_path / "out"
    chief, other = start_workers(tmp_path, multiworker_command(oasis_root, out),
                                 crash_at="train batch:4")
    try:
        assert finish([other])[0][0] == -signal.SIGKILL
    finally:
        chief.kill()
        chief.wait()
    assert json.loads((out / "state.json").read_text())["epochs_done"] == 1
    for leftover in (tmp_path / "worker1" / "tmp").glob("vqvae-worker*"):
        shutil.rmtree(leftover)  # a killed process leaves its temporary folder behind
    for code, output in finish(start_workers(tmp_path, ["--resume", "--out", str(out)])):
        assert code == 0, output[-3000:]
    assert json.loads((out / "state.json").read_text())["epochs_done"] == 2
    assert_workers_agree(tmp_path)
