"""The command line driven as a user (or an attacker) would, with bad input: every case ends with one clear line
on stderr naming what was wrong, no traceback, a non-zero exit status, and the files written before intact.
Bad captions in training data are the exception by design: they are skipped and counted, and the run goes on."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from clipforge.checkpoint import list_checkpoints, verify_checkpoint_dir
from clipforge.cli import main
from run_helpers import events, fork_cli, step_log, tiny_args, wait_exit, wait_for_step

TWO_STEPS = ["--steps=2", "--save_every=2"]


def cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def one_error_line(code: int, err: str, *needles: str) -> str:
    """The single error line, after checking the exit status and that nothing else went wrong."""
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("clipforge: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def files_of(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (the lock file aside: it holds the pid of the last holder)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def no_temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith(".tmp")]


def in_child(workdir: Path, argv: list[str], unprivileged: bool = False, max_file_bytes: int | None = None,
             timeout: float = 180.0) -> tuple[int, str]:
    """(exit status, stderr) of `clipforge <argv>` in a forked child working in `workdir`.

    `unprivileged`: the child drops to user nobody when the tests run as root, so that file permissions apply
    to it as to any user (it reaches files through `workdir`, whose parents nobody may not read).
    `max_file_bytes`: no file may grow past this size (RLIMIT_FSIZE), as on a full disk.
    """
    # imported before the fork: user nobody cannot read root's caches (matplotlib's font list, for one)
    import clipforge.eval.runner
    import clipforge.train.loop  # noqa: F401

    err_path = workdir / "child-stderr.txt"
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(fd, 2)
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            os.chdir(workdir)
            if unprivileged and os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            if max_file_bytes is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, resource.RLIM_INFINITY))
            code = main(argv)
        except BaseException:  # noqa: BLE001 - reported through the captured stderr
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    status = wait_exit(pid, timeout=timeout)
    return os.waitstatus_to_exitcode(status), err_path.read_text()


def write_images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        Image.new("RGB", (40, 40), (37 * i % 256, 90, 200 - 20 * i)).save(folder / f"img{i}.png")
        names.append(f"img{i}.png")
    return names


# --- settings that crashed, or were silently wrong -------------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "eval"])
def test_more_threads_than_cpus_is_one_line_not_a_crash(tmp_path, command):
    # torch's thread pool crashed the process (SIGSEGV) at --threads=100000; a fresh interpreter keeps a crash
    # from taking pytest with it
    argv = (["train", "--no-progress", *tiny_args(tmp_path, "r", *TWO_STEPS), "--threads=100000"]
            if command == "train" else ["eval", "zeroshot", "--model", "ViT-Micro-8-32", "--threads", "100000"])
    done = subprocess.run([sys.executable, "-m", "clipforge", *argv], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    one_error_line(done.returncode, done.stderr, "threads", "100000", f"1 to {os.cpu_count()}")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content,needles", [
    (b"steps: 2\n# caf\xe9 au lait\n", ["cfg.yaml: line 2 is not UTF-8 text (byte 0xe9)"]),
    (b"steps: 2\nseed: 1\nsteps: 3\n", ["cfg.yaml: duplicate key 'steps' on lines 1 and 3"]),
    (b"optim:\n  lr: 0.1\n  lr: 0.2\n", ["duplicate key 'lr' on lines 2 and 3"]),
    (None, ["cfg.yaml is a directory; expected a YAML file"]),
])
def test_a_bad_config_file_names_itself_and_the_problem(tmp_path, capsys, content, needles):
    path = tmp_path / "cfg.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    code, err = cli(capsys, "train", "--no-progress", "--config", str(path), *tiny_args(tmp_path, "r"))
    one_error_line(code, err, *needles)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("override,needle", [
    ("--data.synthetic.object_count_weights=[0,0,0]",
     "'data.synthetic.object_count_weights': expected 3 non-negative weights, not all zero"),
    ("--seed=-1", "'seed': expected an integer in [0, 2**32), got -1"),
    ("--data.synthetic.seed=-1", "'data.synthetic.seed'"),
    ("--run_name=../escaped", "'run_name': expected one folder name inside output_dir, got '../escaped'"),
    ("--run_name=a/b", "'run_name'"),
    ("--optim.lrr=0.1", "unknown config key 'optim.lrr'"),  # one of the cases that was already right
])
def test_impossible_values_stop_before_any_work(tmp_path, capsys, override, needle):
    out = tmp_path / "runs"
    code, err = cli(capsys, "train", "--no-progress", *tiny_args(out, "r", *TWO_STEPS), override)
    one_error_line(code, err, needle)
    assert not out.exists() and not (tmp_path / "escaped").exists()  # nothing written, nothing outside output_dir


@pytest.mark.parametrize("option,value,needle", [
    ("--per-class", "0", "--per-class: expected an integer >= 1, got 0"),
    ("--workers", "-1", "--workers: expected an integer >= 0, got -1"),
    ("--pairs", "0", "--pairs"),
])
def test_eval_options_out_of_range(capsys, option, value, needle):
    code, err = cli(capsys, "eval", "zeroshot", "--model", "ViT-Micro-8-32", "--no-cache", option, value)
    one_error_line(code, err, needle)


# --- bad training data: skipped and counted ---------------------------------------------------------------------

def test_non_utf8_and_empty_captions_are_skipped_and_counted(tmp_path, capsys):
    names = write_images(tmp_path / "data", 6)
    rows = [f"{name},a picture number {i}".encode() for i, name in enumerate(names[:4])]
    rows += [f"{names[4]},caf".encode() + b"\xe9 cr\xe8me", f"{names[5]},   ".encode()]
    manifest = tmp_path / "data" / "pairs.csv"
    manifest.write_bytes(b"image,caption\n" + b"\n".join(rows) + b"\n")
    data = ["--data.source=manifest", f"--data.path={manifest}", "--data.bad_min_samples=1000",
            "--batch_size=4", "--steps=3"]
    code, err = cli(capsys, "train", "--no-progress", *tiny_args(tmp_path, "r", *data))
    assert code == 0 and "Traceback" not in err, err
    summary, = events(tmp_path / "r", "bad_data_summary")
    counts = summary["counts"]
    assert set(counts) == {"caption_not_utf8", "empty_caption"} and min(counts.values()) >= 1
    assert summary["reads"] == 3 * 4 + sum(counts.values())  # every skipped draw is one more read
    bad = events(tmp_path / "r", "bad_sample")
    assert {(Path(e["path"]).name, e["kind"]) for e in bad} == {(names[4], "caption_not_utf8"),
                                                                 (names[5], "empty_caption")}
    # evaluation reads the manifest strictly: the file and line, not a UnicodeDecodeError
    code, err = cli(capsys, "eval", "retrieval", "--model", "ViT-Micro-8-32", "--dataset", str(manifest),
                    "--no-cache")
    one_error_line(code, err, "pairs.csv:6: 'caption' is not UTF-8 text")


# --- nothing lost: resumes, concurrent runs, shard folders -----------------------------------------------------

def _finished_run(tmp_path: Path, name: str = "r") -> Path:
    assert main(["train", "--no-progress", *tiny_args(tmp_path, name, "--steps=4", "--save_every=2")]) == 0
    return tmp_path / name


def test_resume_auto_over_only_unusable_checkpoints_deletes_nothing(tmp_path, capsys):
    run = _finished_run(tmp_path)
    for _, path in list_checkpoints(run / "checkpoints"):
        model = path / "model.safetensors"
        model.write_bytes(model.read_bytes()[:100])  # truncated
    before = files_of(run)
    capsys.readouterr()
    code, err = cli(capsys, "train", "--no-progress", *tiny_args(tmp_path, "r", "--steps=4", "--save_every=2"),
                    "--resume=auto")
    one_error_line(code, err, "every checkpoint in", "is unusable", "nothing was changed")
    assert files_of(run) == before  # the checkpoints, the log and the final model are all still there


def test_resume_from_an_older_checkpoint_of_the_same_run_is_refused(tmp_path, capsys):
    run = _finished_run(tmp_path)
    before = files_of(run)
    older = run / "checkpoints" / "step-00000002"
    capsys.readouterr()
    code, err = cli(capsys, "train", "--no-progress", *tiny_args(tmp_path, "r", "--steps=4", "--save_every=2"),
                    f"--resume={older}")
    one_error_line(code, err, "step-00000002 is at step 2", "checkpoints of steps 4", "model.safetensors",
                   "another run_name")
    assert files_of(run) == before
    # the way to branch from it: another run name, which leaves the original run as it was
    code, err = cli(capsys, "train", "--no-progress", *tiny_args(tmp_path, "branch", "--steps=4", "--save_every=2"),
                    f"--resume={older}")
    assert code == 0, err
    assert files_of(run) == before and step_log(tmp_path / "branch") == step_log(run)[2:]


def test_a_second_train_on_the_same_run_directory_fails_at_once(tmp_path, capsys):
    argv = ["train", "--no-progress", *tiny_args(tmp_path, "r", "--steps=100000", "--save_every=5")]
    first = fork_cli(argv)
    try:
        wait_for_step(tmp_path / "r", 2, first)
        started = time.monotonic()
        code, err = in_child(tmp_path, [*argv, "--resume=auto"], timeout=60)  # the same run, resumed
        one_error_line(code, err, f"run directory {tmp_path / 'r'} is in use", f"(pid {first})")
        assert time.monotonic() - started < 30
    finally:
        os.kill(first, signal.SIGTERM)
    status = wait_exit(first, timeout=60)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 143
    steps = [entry["step"] for entry in step_log(tmp_path / "r")]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved or repeated steps
    kept = list_checkpoints(tmp_path / "r" / "checkpoints")  # how many were kept depends on the machine's speed
    assert kept and max(step for step, _ in kept) == steps[-1]  # SIGTERM saved at the last step boundary
    for _, path in kept:
        verify_checkpoint_dir(path)


def test_shard_folders_are_never_mixed_and_failures_leave_no_temporaries(tmp_path, capsys):
    names = write_images(tmp_path / "data", 5)
    manifest = tmp_path / "data" / "pairs.csv"
    manifest.write_text("image,caption\n" + "".join(f"{n},picture {i}\n" for i, n in enumerate(names)))
    out = tmp_path / "shards"
    assert main(["data", "shards", "--from", str(manifest), "--out", str(out), "--per-shard", "2"]) == 0
    before = files_of(out)
    assert sorted(before) == sorted([f"0000{i}.tar" for i in range(3)] + [f"0000{i}_stats.json" for i in range(3)])
    capsys.readouterr()
    code, err = cli(capsys, "data", "shards", "--from", str(manifest), "--out", str(out), "--per-shard", "3")
    one_error_line(code, err, f"--out {out}: already holds 3 shards", "--overwrite")
    assert files_of(out) == before
    code, err = cli(capsys, "data", "shards", "--from", str(manifest), "--out", str(out), "--per-shard", "0")
    one_error_line(code, err, "--per-shard: expected a positive number of samples, got 0")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    code, err = cli(capsys, "data", "shards", "--from", str(manifest), "--out", str(a_file))
    one_error_line(code, err, f"--out {a_file}: is a file")
    assert a_file.read_text() == "keep me" and files_of(out) == before and not no_temporaries(tmp_path)
    # --overwrite replaces the set: 2 shards of 3, the old third shard gone
    assert main(["data", "shards", "--from", str(manifest), "--out", str(out), "--per-shard", "3",
                 "--overwrite"]) == 0
    assert sorted(files_of(out)) == ["00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json"]


# --- the file system says no ------------------------------------------------------------------------------------

def test_read_only_output_and_cache_folders(tmp_path):
    earlier = _finished_run(tmp_path / "out", "earlier")  # a run written before the folder became read-only
    before = files_of(tmp_path / "out")
    cache = tmp_path / "cache"
    cache.mkdir()
    for folder in (tmp_path / "out", earlier, earlier / "checkpoints", cache):
        folder.chmod(0o555)
    try:
        code, err = in_child(tmp_path, ["train", "--no-progress", *tiny_args(Path("out"), "new", *TWO_STEPS)],
                             unprivileged=True)
        one_error_line(code, err, "config key 'output_dir': cannot write in run directory out/new")
        code, err = in_child(tmp_path, ["train", "--no-progress", *tiny_args(Path("out"), "earlier", "--steps=4",
                                                                             "--save_every=2"), "--resume=auto"],
                             unprivileged=True)
        one_error_line(code, err, "cannot write in run directory out/earlier")
        code, err = in_child(tmp_path, ["eval", "zeroshot", "--model", "ViT-Micro-8-32", "--per-class", "1",
                                        "--cache-dir", "cache"], unprivileged=True)
        one_error_line(code, err, "--cache-dir cache: cannot write there", "--no-cache")
    finally:
        for folder in (tmp_path / "out", earlier, earlier / "checkpoints", cache):
            folder.chmod(0o755)
    assert files_of(tmp_path / "out") == before


def test_a_full_disk_mid_run_keeps_the_earlier_checkpoint(tmp_path):
    run = _finished_run(tmp_path)
    # as if killed right after its step-2 checkpoint
    (run / "model.safetensors").unlink()
    list_checkpoints(run / "checkpoints")[-1][1].rename(tmp_path / "set-aside")
    step2 = files_of(run / "checkpoints")
    size = (run / "checkpoints" / "step-00000002" / "model.safetensors").stat().st_size
    code, err = in_child(tmp_path, ["train", "--no-progress", *tiny_args(tmp_path, "r", "--steps=4", "--save_every=2"),
                                    "--resume=latest"], max_file_bytes=size // 2)
    one_error_line(code, err, "checkpoints/step-00000004/model.safetensors: File too large")
    assert code == 1
    assert files_of(run / "checkpoints") == step2 and not no_temporaries(run)
    verify_checkpoint_dir(run / "checkpoints" / "step-00000002")
    assert json.loads((run / "log.jsonl").read_text().splitlines()[-1])["step"] <= 4
