"""Nothing lost, nothing crashes: each test injects one fault of issue 22 (numbered as there) and checks
that no data is lost and the command ends with one clear line, never a traceback.

Faults are real: signals sent to real processes, bytes flipped on disk, two processes on one run, a
full or read-only file system mounted for the test (tmpfs; skipped, with the reason, where the test
cannot mount one).
"""

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.helpers import cli, cli_process, metric_rows

# LeNet-5 on small synthetic images: 6 steps an epoch, an epoch in well under a second once compiled
FAST = ["--set", "data.source=synthetic:16x16x1:4", "--set", "data.limit=400", "--set", "data.val_fraction=0.25",
        "--set", "train.batch_size=50", "--set", "train.log_every=1", "--set", "optim.name=adam",
        "--set", "optim.lr=0.01", "--set", "train.eval_batch_size=100"]


def _train(run_dir, *extra, epochs=3):
    result = cli("train", "lenet5_fashion_mnist", "--run-dir", run_dir, *FAST, "--set", f"train.epochs={epochs}",
                 *extra)
    assert result.exit_code == 0, result.output
    return run_dir


def _eval(run_dir, *extra):
    result = cli("eval", run_dir, "--json", "--split", "val", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


def _one_line_error(result, *expected):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.stderr.split())
    for part in expected:
        assert part in text, (part, result.stderr)


def _index(run_dir):
    return json.loads((run_dir / "checkpoints" / "index.json").read_text())


def _flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _largest_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def top3(tmp_path_factory):
    """3 epochs keeping every epoch's checkpoint (top 3): each epoch restorable on its own."""
    return _train(tmp_path_factory.mktemp("rel") / "top3", "--set", "train.keep_checkpoints=3")


def _copy(run_dir, tmp_path, name="copy"):
    out = tmp_path / name
    shutil.copytree(run_dir, out)
    return out


# ----------------------------------------------------------------------------- 1. --overwrite


def test_1_overwrite_refuses_a_directory_without_a_run(tmp_path):
    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "recipe.yaml").write_text("my own notes\n")
    (notes / "thesis.tex").write_text("precious\n")
    for extra in ([], ["--overwrite"]):
        result = cli("train", "lenet5_fashion_mnist", "--run-dir", notes, *FAST, *extra)
        _one_line_error(result, "holds no cnncli run", "recipe.yaml")
    assert (notes / "recipe.yaml").read_text() == "my own notes\n" and (notes / "thesis.tex").is_file()
    assert sorted(p.name for p in notes.iterdir()) == ["recipe.yaml", "thesis.tex"]  # not even a lock file left
    (notes / "recipe.yaml").unlink()  # nothing a run would write, yet not a run: --overwrite is still refused
    _one_line_error(cli("train", "lenet5_fashion_mnist", "--run-dir", notes, *FAST, "--overwrite"),
                    "holds no cnncli run, so --overwrite has nothing to replace")
    assert sorted(p.name for p in notes.iterdir()) == ["thesis.tex"]


def test_1_overwrite_of_the_working_directory_deletes_nothing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")  # another tool's file that a run would replace
    proc = cli_process("train", "lenet5_fashion_mnist", "--run-dir", ".", "--overwrite", *FAST, cwd=tmp_path)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in stderr and "holds no cnncli run" in stderr, stderr
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"


@pytest.mark.slow
def test_1_overwrite_of_a_run_deletes_only_the_runs_files(tmp_path):
    run = _train(tmp_path / "run", epochs=1)
    (run / "notes.txt").write_text("keep me\n")
    (run / "plots").mkdir(exist_ok=True)
    result = cli("train", "lenet5_fashion_mnist", "--run-dir", run, *FAST, "--set", "train.epochs=1", "--overwrite")
    assert result.exit_code == 0, result.output
    assert "kept 1 entries" in result.stderr and (run / "notes.txt").read_text() == "keep me\n"
    assert [r["epoch"] for r in metric_rows(run)] == [1]


# ----------------------------------------------------------------------------- 2. two writers, readers


def _wait_for(predicate, proc, timeout=300, what="progress"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the process ended before {what}: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError(f"no {what} in {timeout} s")


@pytest.mark.slow
def test_2_second_writer_is_refused_and_readers_never_crash(tmp_path):
    run = tmp_path / "busy"
    # many short epochs: a checkpoint (and a pruning of the previous one) several times a second
    writer = cli_process("train", "lenet5_fashion_mnist", "--run-dir", run, *FAST, "--set", "train.epochs=400")
    try:
        _wait_for(lambda: (run / "checkpoints" / "index.json").is_file(), writer, what="a first checkpoint")
        for args in (["train", "--resume", "--run-dir", run], ["train", "lenet5_fashion_mnist", "--run-dir", run,
                                                               *FAST, "--overwrite"]):
            result = cli(*args)
            _one_line_error(result, "is being written by PID", str(writer.pid))
        evaluated = []
        for which in ("latest", "best") * 3:
            out, _ = _eval(run, "--checkpoint", which)
            evaluated.append(out["checkpoint"])
        assert writer.poll() is None, "the run must still be training while it is read"
        assert len(set(evaluated)) > 1  # the readers saw the run move on
    finally:
        writer.send_signal(signal.SIGINT)
        _, stderr = writer.communicate(timeout=120)
    assert writer.returncode == 130 and "Traceback" not in stderr, stderr
    rows = metric_rows(run)
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))  # one writer: no interleaved rows


# ----------------------------------------------------------------------------- 3. bit rot


@pytest.mark.slow
def test_3_flipped_bytes_are_detected_and_eval_falls_back(top3, tmp_path):
    run = _copy(top3, tmp_path)
    index = _index(run)
    best, latest = index["best"]["dir"], index["latest"]["dir"]
    assert best != latest or len(index["top"]) == 3
    reference = {}
    for step_dir in sorted((run / "checkpoints").glob("step_*")):
        out, _ = _eval(step_dir)
        reference[step_dir.name] = out
    _flip(_largest_file(run / "checkpoints" / best))
    out, stderr = _eval(run)
    text = " ".join(stderr.split())
    assert f"{best}: state/" in text and "does not match its checksum" in text and "using the newest intact" in text
    used = Path(out["checkpoint"]).name
    assert used != best and out["top1"] == reference[used]["top1"] and out["loss"] == reference[used]["loss"]
    single = cli("eval", run / "checkpoints" / best, "--json")
    _one_line_error(single, "is damaged", "does not match its checksum")
    for step_dir in (run / "checkpoints").glob("step_*"):
        _flip(step_dir / "meta" / "metadata", 2)
    _one_line_error(cli("eval", run), "no intact checkpoint", "meta/metadata does not match its checksum")


@pytest.mark.slow
def test_3_resume_falls_back_past_a_damaged_latest_and_matches_the_uninterrupted_run(top3, tmp_path):
    run = _copy(top3, tmp_path)
    latest = _index(run)["latest"]["dir"]
    _flip(_largest_file(run / "checkpoints" / latest))
    result = cli("train", "--resume", "--run-dir", run)
    assert result.exit_code == 0, result.output
    assert "using the newest intact one" in " ".join(result.stderr.split())
    assert metric_rows(run) == metric_rows(top3)  # epoch 3 trained again, bit for bit
    assert json.loads((run / "summary.json").read_text())["test"] == json.loads((top3 / "summary.json").read_text())[
        "test"]


def test_3_json_output_never_holds_a_bare_nan():
    from cnncli.console import to_json

    text = to_json({"loss": float("nan"), "rows": [float("inf"), 1.5]})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {"loss": None, "rows": [None, 1.5]}


# ----------------------------------------------------------------------------- 4. recipe names


@pytest.mark.parametrize("name", ["../notes", "/tmp/elsewhere", "a/b", ".hidden"])
def test_4_recipe_names_that_are_paths_are_refused(tmp_path, name):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: '{name}'\nmodel: {{name: lenet5}}\n")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    result = cli_process("train", recipe, "--overwrite", *FAST, cwd=tmp_path / "notes")
    _, stderr = result.communicate(timeout=120)
    assert result.returncode == 2 and "a recipe name is a plain name" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["keep.txt", "notes", "r.yaml"]


# ----------------------------------------------------------------------------- 5. hostile recipes


BOMB = """name: bomb
model: {name: lenet5}
data: {classes: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]}
"""


def _bomb(levels=9):
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines)


@pytest.mark.parametrize("where", ["top", "typed key"])
def test_5_alias_bomb_is_refused_at_once(tmp_path, where):
    anchors = _bomb()
    text = (f"name: bomb\nmodel: {{name: lenet5}}\n{anchors}\n" if where == "top" else
            f"name: bomb\nmodel: {{name: lenet5}}\ndescription:\n  - {{{anchors.replace(chr(10), ', ')}}}\n"
            "data: {classes: *a8}\n")
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    assert path.stat().st_size < 1000
    start = time.perf_counter()
    result = cli("train", path, "--dry-run")
    assert time.perf_counter() - start < 10
    _one_line_error(result, "expands to more than 100,000 values")
    assert len(result.stderr) < 400  # nothing of the expanded input is echoed
    set_bomb = cli("train", "lenet5_fashion_mnist", "--dry-run", "--set", "data.classes=" + "[" * 5000 + "]" * 5000)
    _one_line_error(set_bomb, "data.classes")
    assert len(set_bomb.stderr) < 400


def test_5_sizes_a_recipe_can_request_are_bounded(tmp_path):
    layers = "[{repeat: 1000000000, layers: [relu]}, fc]"
    cases = [(["--set", "model.name=sequential", "--set", f"model.layers={layers}"], "1,000,000,000 layers"),
             (["--set", "data.image_size=[100000,100000]"], "data.image_size.0"),
             (["--set", "seed=18446744073709551616"], "key 'seed'"),
             (["--set", "data.classes=[" + ",".join(["1"] * 2000) + "]"], "repeats class 1")]
    for args, expected in cases:
        start = time.perf_counter()
        result = cli("train", "lenet5_fashion_mnist", "--dry-run", *FAST, *args)
        assert time.perf_counter() - start < 60
        _one_line_error(result, expected)
        assert len(result.stderr) < 600


# ----------------------------------------------------------------------------- 6-7. signals


def _running_process(run, epochs=40):
    proc = cli_process("train", "lenet5_fashion_mnist", "--run-dir", run, *FAST, "--set", f"train.epochs={epochs}")
    _wait_for(lambda: (run / "checkpoints" / "index.json").is_file(), proc, what="a first checkpoint")
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_6_sigterm_and_sighup_checkpoint_the_step_and_resume_exactly(tmp_path, sig):
    reference = _train(tmp_path / "reference", epochs=6)
    run = tmp_path / "preempted"
    proc = cli_process("train", "lenet5_fashion_mnist", "--run-dir", run, *FAST, "--set", "train.epochs=6")
    _wait_for(lambda: (run / "checkpoints" / "index.json").is_file(), proc, what="a first checkpoint")
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    assert "checkpoint saved" in stderr and "--resume" in stderr and "Traceback" not in stderr
    result = cli("train", "--resume", "--run-dir", run)
    assert result.exit_code == 0, result.output
    assert metric_rows(run) == metric_rows(reference)


@pytest.mark.slow
def test_6_sigterm_during_the_test_pass_says_how_to_finish_the_run(tmp_path, monkeypatch):
    """A signal after the last step (the test pass, outside the steps) leaves the last checkpoint; the
    message says so and `--resume` finishes the run from it."""
    from cnncli.interrupts import Interrupt
    from cnncli.train import loop

    def preempted(*args, **kwargs):
        raise Interrupt(signal.SIGTERM)

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(loop, "finish", preempted)
        result = cli("train", "lenet5_fashion_mnist", "--run-dir", run, *FAST, "--set", "train.epochs=1")
    assert result.exit_code == 143, result.output
    assert "stopped by SIGTERM outside the training steps" in result.stderr and "--resume" in result.stderr
    assert not (run / "summary.json").exists()
    result = cli("train", "--resume", "--run-dir", run)
    assert result.exit_code == 0, result.output
    assert json.loads((run / "summary.json").read_text())["test"]["n"] > 0


@pytest.mark.slow
def test_7_ctrl_c_twice_in_quick_succession_stops_cleanly(tmp_path):
    run = tmp_path / "twice"
    proc = _running_process(run)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert cli("train", "--resume", "--run-dir", run).exit_code == 0  # whatever was on disk is consistent


@pytest.mark.slow
def test_7_ctrl_c_during_start_up_is_not_lost(tmp_path):
    run = tmp_path / "startup"
    proc = cli_process("train", "lenet5_fashion_mnist", "--run-dir", run, *FAST, "--set", "train.epochs=200")
    time.sleep(1.5)  # importing JAX, loading data, compiling
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert len(metric_rows(run)) < 200 if (run / "metrics.jsonl").exists() else True
    assert not (run / "summary.json").exists() or json.loads((run / "summary.json").read_text()).get("stopped")


@pytest.mark.slow
def test_7_a_signal_during_a_checkpoint_write_waits_for_it(tmp_path, monkeypatch):
    """A Ctrl-C raised in the middle of the write (just before Orbax's rename) is delivered after it."""
    from cnncli.run import checkpoint

    run = _train(tmp_path / "run", epochs=1)
    template = _template(run)
    seal = checkpoint._seal

    def interrupted_seal(tmp):
        signal.raise_signal(signal.SIGINT)
        seal(tmp)

    monkeypatch.setattr(checkpoint, "_seal", interrupted_seal)
    meta = {"epoch": 1, "step_in_epoch": 3, "global_step": 9, "best": {}}
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(run / "checkpoints", state=template, totals=_zero_totals(), meta=meta, best=False)
    assert checkpoint.damage(run / "checkpoints" / "step_9") is None
    assert _index(run)["latest"]["dir"] == "step_9"


def _template(run):
    """The run's restored TrainState (with its optimizer state), for calling checkpoint.save directly."""
    import jax.numpy as jnp

    from cnncli import recipe as recipe_lib
    from cnncli.run import checkpoint
    from cnncli.train import optim
    from cnncli.train.state import TrainState, build

    recipe = recipe_lib.load(run / "recipe.yaml")
    data = json.loads((run / "data.json").read_text())
    model = build(recipe, tuple(data["image_shape"]), len(data["class_names"]), data["mean"], data["std"])
    lr = optim.learning_rate(recipe.optim, recipe.schedule, epochs=recipe.train.epochs, steps_per_epoch=6)
    tx = optim.build_optimizer(recipe.optim, lr, model.params)
    state = TrainState(model.params, model.rest, tx.init(model.params), jnp.zeros((), jnp.int32))
    ckpt, _ = checkpoint.find(run, "latest")
    return checkpoint.restore(ckpt, state)[0]


def _zero_totals():
    import jax.numpy as jnp

    return {"loss": jnp.zeros(()), "correct": jnp.zeros(()), "count": jnp.zeros(())}


# ----------------------------------------------------------------------------- 8. NaN never becomes latest


@pytest.mark.slow
def test_8_a_non_finite_step_is_never_saved(tmp_path):
    import jax.numpy as jnp

    from cnncli.run import checkpoint

    run = _train(tmp_path / "run", epochs=1)
    before = _index(run)
    state = _template(run)
    meta = {"epoch": 1, "step_in_epoch": 2, "global_step": 8, "best": {}}
    nan_loss = {**_zero_totals(), "loss": jnp.asarray(float("nan"))}
    with pytest.raises(checkpoint.NotFinite, match="training loss is nan"):
        checkpoint.save(run / "checkpoints", state=state, totals=nan_loss, meta=meta, best=False)
    import jax

    leaves, treedef = jax.tree.flatten(state.params)
    params = jax.tree.unflatten(treedef, [leaves[0] * jnp.inf, *leaves[1:]])
    with pytest.raises(checkpoint.NotFinite, match="weights hold NaN or infinite"):
        checkpoint.save(run / "checkpoints", state=replace(state, params=params), totals=_zero_totals(), meta=meta,
                        best=False)
    assert _index(run) == before and not (run / "checkpoints" / "step_8").exists()


# ----------------------------------------------------------------------------- 9. damaged run directories


@pytest.mark.parametrize("damage", ["truncated data file", "missing _METADATA", "deleted latest", "empty index",
                                    "truncated index", "deleted index"])
@pytest.mark.slow
def test_9_damaged_checkpoints_fall_back_to_the_newest_intact_one(top3, tmp_path, damage):
    run = _copy(top3, tmp_path)
    ckpts = run / "checkpoints"
    latest = _index(run)["latest"]["dir"]
    expected, _ = _eval(ckpts / latest)
    if damage == "truncated data file":
        victim = _largest_file(ckpts / latest)
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif damage == "missing _METADATA":
        (ckpts / latest / "state" / "_METADATA").unlink()
    elif damage == "deleted latest":
        shutil.rmtree(ckpts / latest)
    elif damage == "empty index":
        (ckpts / "index.json").write_text("")
    elif damage == "truncated index":
        text = (ckpts / "index.json").read_text()
        (ckpts / "index.json").write_text(text[: len(text) // 2])
    else:
        (ckpts / "index.json").unlink()
    out, stderr = _eval(run, "--checkpoint", "latest")
    text = " ".join(stderr.split())
    if "index" in damage:  # the index is rebuilt from the step directories: the same checkpoint
        assert "rebuilt from the step directories" in text
        assert (out["top1"], out["loss"]) == (expected["top1"], expected["loss"])
        best, _ = _eval(run)  # the intact best is still evaluable
        assert Path(best["checkpoint"]).name == _index(top3)["best"]["dir"]
    else:
        assert "using the newest intact one" in text and Path(out["checkpoint"]).name != latest


@pytest.mark.slow
def test_9_deleted_or_damaged_run_files_use_the_checkpoints_copy(top3, tmp_path):
    run = _copy(top3, tmp_path)
    expected, _ = _eval(run)
    (run / "data.json").unlink()
    (run / "recipe.yaml").write_text("name: [unclosed\n")
    out, stderr = _eval(run)
    assert "data.json is missing: using the copy" in " ".join(stderr.split())
    assert (out["top1"], out["loss"]) == (expected["top1"], expected["loss"])
    (run / "recipe.yaml").unlink()
    out, _ = _eval(run)
    assert out["top1"] == expected["top1"]


@pytest.mark.slow
def test_9_nothing_usable_names_the_damaged_file(top3, tmp_path):
    run = _copy(top3, tmp_path)
    for step_dir in (run / "checkpoints").glob("step_*"):
        (step_dir / "SHA256SUMS").unlink()
    _one_line_error(cli("eval", run), "no intact checkpoint", "SHA256SUMS is missing")
    _one_line_error(cli("train", "--resume", "--run-dir", run), "no intact checkpoint", "SHA256SUMS is missing")


@pytest.mark.slow
def test_9_every_checkpoint_file_is_fsynced_before_the_rename_and_the_index_after(tmp_path, monkeypatch):
    """What the power-loss promise rests on: the data reaches the disk before the name that points at it."""
    from cnncli.run import checkpoint

    run = _train(tmp_path / "run", epochs=1)
    state = _template(run)
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(a, b, **kw):
        events.append(("rename", str(a), str(b)))
        real_rename(a, b, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    meta = {"epoch": 1, "step_in_epoch": 1, "global_step": 7, "best": {}}
    checkpoint.save(run / "checkpoints", state=state, totals=_zero_totals(), meta=meta, best=False)
    step_dir = run / "checkpoints" / "step_7"
    renamed = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2].endswith("/step_7"))
    synced_before = {Path(e[1]).name for e in events[:renamed] if e[0] == "fsync"}
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.name not in checkpoint.UNSUMMED[:1]
             and p.relative_to(step_dir).as_posix() != "commit_success.txt"]
    assert files and all(p.name in synced_before for p in files)
    index_synced = [i for i, e in enumerate(events) if e[0] == "fsync" and e[1].endswith("index.json.tmp")]
    assert index_synced and index_synced[0] > renamed


# ----------------------------------------------------------------------------- 10. full and read-only disks


def _mount_tmpfs(path: Path, size: str, *options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join([f"size={size}", *options])
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    _mount_tmpfs(mount, "24m")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(mount: Path) -> Path:
    filler = mount / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    return filler


@pytest.mark.slow
def test_10_disk_full_during_training_keeps_the_last_checkpoint_and_resumes(small_disk):
    from cnncli.run import checkpoint

    run = small_disk / "run"
    proc = _running_process(run, epochs=400)
    filler = _fill(small_disk)
    _, stderr = proc.communicate(timeout=120)
    text = " ".join(stderr.split())
    assert proc.returncode == 2 and "Traceback" not in stderr, stderr
    assert "disk full" in text and "is intact" in text and "--resume" in text
    assert not list((run / "checkpoints").glob("*orbax-checkpoint-tmp*"))  # no half-written checkpoint left
    latest = _index(run)["latest"]["dir"]
    assert checkpoint.damage(run / "checkpoints" / latest) is None
    filler.unlink()
    proc = cli_process("train", "--resume", "--run-dir", run)
    _wait_for(lambda: _index(run)["latest"]["dir"] != latest, proc, what="a checkpoint after the resume")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr


def test_10_read_only_file_or_under_a_file_are_refused_before_loading_data(tmp_path):
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "1m", "ro")
    try:
        cases = [(ro / "run", "read-only"), (tmp_path / "afile", "is a file"), (tmp_path / "afile" / "run",
                                                                                "is a file, not a directory")]
        (tmp_path / "afile").write_text("x")
        for run_dir, expected in cases:
            start = time.perf_counter()
            result = cli("train", "lenet5_fashion_mnist", "--run-dir", run_dir)  # full Fashion-MNIST: not loaded
            assert time.perf_counter() - start < 20
            _one_line_error(result, expected)
            assert "train /" not in result.stderr  # the model line comes after loading the data
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_10_metrics_rows_and_index_are_never_half_written(tmp_path, monkeypatch):
    from cnncli.run.rundir import RunDir, write_atomic

    run = RunDir(tmp_path)
    run.append_metrics({"epoch": 1, "loss": 0.5})

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        run.append_metrics({"epoch": 2, "loss": 0.4})
    with pytest.raises(OSError):
        write_atomic(tmp_path / "index.json", "{}")
    monkeypatch.undo()
    assert run.metrics.read_text() == '{"epoch": 1, "loss": 0.5}\n'  # the failed row was rolled back
    assert not (tmp_path / "index.json").exists() and not (tmp_path / "index.json.tmp").exists()


# ----------------------------------------------------------------------------- 11-12. bad input


def test_11_unreadable_recipes_are_one_line(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\nmodel: {name: lenet5}\n".encode("latin-1"))
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: deep\nmodel: {name: lenet5}\ntrain: {epochs: " + "[" * 20000 + "]" * 20000 + "}\n")
    dup = tmp_path / "dup.yaml"
    dup.write_text("name: dup\nmodel: {name: lenet5}\ntrain: {epochs: 3}\ntrain: {epochs: 5}\n")
    big = tmp_path / "big.yaml"
    big.write_text("name: big\n" + "#" * (2 << 20))
    for path, expected in [(latin1, "is not UTF-8 text"), (deep, "nested more than 50 levels"),
                           (dup, "duplicate key 'train' at line 4"), (big, "larger than 1 MB")]:
        _one_line_error(cli("train", path, "--dry-run"), expected)
    _one_line_error(cli("train", "lenet5_fashion_mnist", "--dry-run", "--set", "train.epochs.x.y=1"),
                    "'train.epochs' is a value, not a section")


def test_12_hidden_folders_are_not_training_images(tmp_path):
    from PIL import Image

    from cnncli.data.sources import load_dataset

    for cls in ("cat", "dog"):
        (tmp_path / "pets" / cls / ".ipynb_checkpoints").mkdir(parents=True)
        (tmp_path / "pets" / cls / "sub").mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "pets" / cls / f"{i}.png")
        Image.new("RGB", (8, 8)).save(tmp_path / "pets" / cls / ".ipynb_checkpoints" / "0-checkpoint.png")
        Image.new("RGB", (8, 8)).save(tmp_path / "pets" / cls / "sub" / "nested.png")
    ds = load_dataset(f"folder:{tmp_path / 'pets'}")
    assert len(ds.train_x) == 8  # 3 + 1 nested per class; the checkpoint copies are not read


@pytest.mark.slow
def test_12_unknown_checkpoint_name_is_an_error(top3):
    _one_line_error(cli("eval", top3, "--checkpoint", "bogus"), "--checkpoint must be best or latest")


# ----------------------------------------------------------------------------- runs of the earlier layout


def _to_legacy(run: Path) -> None:
    """Rewrite a run's checkpoints in the layout cnncli used before format 2: one StandardCheckpointer tree
    per step directory, the optimizer state as a list of its leaves, an index without "format"."""
    import jax
    import orbax.checkpoint as ocp

    from cnncli.run import checkpoint

    ckpts = run / "checkpoints"
    index = _index(run)
    state = _template(run)
    for step_dir in sorted(ckpts.glob("step_*")):
        restored, totals = checkpoint.restore(step_dir, state)
        from flax import nnx

        tree = {"params": checkpoint._saveable(nnx.to_pure_dict(restored.params)),
                "rest": checkpoint._saveable(nnx.to_pure_dict(restored.rest)),
                "opt_state": checkpoint._saveable(jax.tree.leaves(restored.opt_state)), "step": restored.step,
                "totals": totals}
        shutil.rmtree(step_dir)
        saver = ocp.StandardCheckpointer()
        saver.save(step_dir.absolute(), jax.device_get(tree))
        saver.wait_until_finished()
        saver.close()
    index.pop("format")
    (ckpts / "index.json").write_text(json.dumps(index))


@pytest.mark.slow
def test_runs_of_the_earlier_layout_still_evaluate_and_resume(top3, tmp_path):
    reference = _eval(top3)[0]
    run = _copy(top3, tmp_path)
    _to_legacy(run)
    index = _index(run)
    assert "format" not in index and not (run / "checkpoints" / index["latest"]["dir"] / "SHA256SUMS").exists()
    out, _ = _eval(run)
    assert (out["top1"], out["loss"]) == (reference["top1"], reference["loss"])
    # back to the end of epoch 2, then resume: the legacy optimizer state (a list of leaves) carries on exactly
    epoch2 = next({k: v for k, v in e.items() if k != "score"} for e in index["top"] if e["epoch"] == 2)
    shutil.rmtree(run / "checkpoints" / index["latest"]["dir"])
    index.update(latest=epoch2, best=epoch2 if index["best"]["epoch"] == 3 else index["best"])
    (run / "checkpoints" / "index.json").write_text(json.dumps(index))
    result = cli("train", "--resume", "--run-dir", run)
    assert result.exit_code == 0, result.output
    assert metric_rows(run) == metric_rows(top3)
    assert (run / "checkpoints" / _index(run)["latest"]["dir"] / "SHA256SUMS").is_file()  # saved in today's layout


@pytest.mark.slow
def test_a_checkpoint_carries_an_extra_json_item_under_its_checksums(tmp_path):
    """What a data pipeline needs to resume its position (issue 24) travels in the checkpoint, checked."""
    from cnncli.run import checkpoint

    run = _train(tmp_path / "run", epochs=1)
    position = {"shard": 3, "offset": 1234, "seen": [1, 2]}
    meta = {"epoch": 1, "step_in_epoch": 2, "global_step": 8, "best": {}}
    checkpoint.save(run / "checkpoints", state=_template(run), totals=_zero_totals(), meta=meta, best=False,
                    extra=position)
    step_dir = run / "checkpoints" / "step_8"
    assert checkpoint.read_extra(step_dir) == position
    assert "extra/metadata" in (step_dir / "SHA256SUMS").read_text()
    _flip(step_dir / "extra" / "metadata", 3)
    assert checkpoint.damage(step_dir) == "extra/metadata does not match its checksum"
