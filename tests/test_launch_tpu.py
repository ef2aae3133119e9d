"""launch_tpu.sh against a fake `gcloud` on PATH that records its calls and plays a slice.

The fake keeps the slice's state in files: `vm_state` (a TPU VM) and `qr_state` (a queued
resource), one state per line; each describe consumes the first line (the last one stays).
create writes READY (ACTIVE; or the lines of `qr_after_create`), delete writes ABSENT, scp
keeps a copy of the shipped tarball. The script runs from a copy inside a small git repository
(so the tests can dirty its working tree) and from another working directory. The worker side
(`launch_tpu.sh _worker start|status|stop`) runs here too, with HOME in a temporary folder and
a stand-in for the venv's imprint-jax.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "launch_tpu.sh"
SEP = "\x1f"

FAKE_GCLOUD = r"""#!/usr/bin/env bash
F="$FAKE_DIR"
line=$(printf '%s\x1f' "$@"); printf '%s\n' "$line" >> "$F/calls"  # one write: calls may overlap
pop() {  # prints the first line of $1 and drops it unless it is the last
  local first; first=$(head -n 1 "$1")
  if [[ $(wc -l < "$1") -gt 1 ]]; then tail -n +2 "$1" > "$1.tmp"; mv "$1.tmp" "$1"; fi
  echo "$first"
}
case "$3 $4" in
  "tpu-vm describe"|"queued-resources describe")
    f="$F/vm_state"; [[ "$3" == queued-resources ]] && f="$F/qr_state"
    st=$(pop "$f")
    if [[ "$st" == ABSENT ]]; then
      echo "ERROR: (gcloud.compute.tpus.$3.describe) NOT_FOUND: Resource '$5' was not found" >&2
      exit 1
    fi
    echo "$st" ;;
  "tpu-vm create") echo READY > "$F/vm_state" ;;
  "queued-resources create")
    if [[ -f "$F/qr_after_create" ]]; then cp "$F/qr_after_create" "$F/qr_state"
    else echo ACTIVE > "$F/qr_state"; fi ;;
  "tpu-vm delete") echo ABSENT > "$F/vm_state" ;;
  "queued-resources delete") echo ABSENT > "$F/qr_state" ;;
  "tpu-vm scp") cp "$5" "$F/shipped.tar.gz" ;;
  "tpu-vm ssh")
    for a in "$@"; do
      if [[ "$a" == *"_worker status"* && -f "$F/worker_status" ]]; then pop "$F/worker_status"; fi
    done ;;
esac
exit 0
"""


@pytest.fixture
def env(tmp_path):
  """A git repository holding launch_tpu.sh, a fake gcloud on PATH, a working directory."""
  repo = tmp_path / "repo"
  repo.mkdir()
  shutil.copy(SCRIPT, repo / "launch_tpu.sh")
  (repo / "requirements.lock").write_text("jax==0.10.2\n")
  (repo / "configs").mkdir()
  (repo / "configs" / "stage1.py").write_text("# config\n")
  (repo / ".gitignore").write_text("ignored/\n")
  git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
  subprocess.run(git[:3] + ["init", "-q"], check=True)
  subprocess.run(git + ["add", "-A"], check=True)
  subprocess.run(git + ["commit", "-q", "-m", "init"], check=True)
  fake = tmp_path / "fake"
  (fake / "bin").mkdir(parents=True)
  (fake / "bin" / "gcloud").write_text(FAKE_GCLOUD)
  (fake / "bin" / "gcloud").chmod(0o755)
  cwd = tmp_path / "elsewhere"
  cwd.mkdir()
  return {"repo": repo, "fake": fake, "cwd": cwd}


def state(env, vm=None, qr=None, qr_after_create=None):
  for name, lines in (("vm_state", vm), ("qr_state", qr), ("qr_after_create", qr_after_create)):
    if lines is not None:
      (env["fake"] / name).write_text("\n".join(lines) + "\n")


def launch(env, *args, gcloud=True):
  path = f"{env['fake'] / 'bin'}:{os.environ['PATH']}" if gcloud else os.environ["PATH"]
  return subprocess.run(["bash", str(env["repo"] / "launch_tpu.sh"), *args], cwd=env["cwd"],
                        env={**os.environ, "PATH": path, "FAKE_DIR": str(env["fake"])},
                        capture_output=True, text=True, timeout=60)


def calls(env) -> list[list[str]]:
  f = env["fake"] / "calls"
  if not f.exists():
    return []
  return [line.split(SEP)[:-1] for line in f.read_text().splitlines()]


def verbs(env) -> list[str]:
  """Each call as 'tpu-vm create', 'queued-resources describe', 'tpu-vm ssh'..."""
  return [f"{c[2]} {c[3]}" for c in calls(env)]


def ssh_commands(env) -> list[tuple[str, str]]:
  out = []
  for c in calls(env):
    if c[2:4] == ["tpu-vm", "ssh"]:
      worker = next(a for a in c if a.startswith("--worker="))
      out.append((worker, c[c.index("--command") + 1]))
  return out


LOC = ["--name", "imp", "--zone", "us-east5-a"]
TRAIN = ["--", "train", "--config", "configs/stage1.py", "--workdir", "gs://bkt/runs/s1",
         "--set", "data.sources=((\"/gcs/bkt/pairs/mvimgnet\", 1.0),)"]
START = ("bash imprint-jax/src/launch_tpu.sh _worker start gs://bkt/jax-cache -- train --config"
         " configs/stage1.py --workdir gs://bkt/runs/s1 --set"
         " 'data.sources=((\"/gcs/bkt/pairs/mvimgnet\", 1.0),)' --distributed --resume")
SETUP = ("set -e; mkdir -p imprint-jax; rm -rf imprint-jax/incoming; mkdir imprint-jax/incoming;"
         " tar -xzf imprint-jax-src.tar.gz -C imprint-jax/incoming;"
         " bash imprint-jax/incoming/launch_tpu.sh _worker setup bkt 40000")


def test_create_installs_and_starts_on_all_workers(env):
  state(env, vm=["ABSENT"])
  r = launch(env, "run", *LOC, "--type", "v5p-128", "--bucket", "bkt", *TRAIN)
  assert r.returncode == 0, r.stderr
  assert verbs(env) == ["tpu-vm describe", "tpu-vm create", "tpu-vm describe", "tpu-vm scp",
                        "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh"]
  c = calls(env)
  assert c[1] == ["compute", "tpus", "tpu-vm", "create", "imp", "--zone", "us-east5-a",
                  "--accelerator-type", "v5p-128", "--version", "v2-alpha-tpuv5"]
  assert c[3] == ["compute", "tpus", "tpu-vm", "scp", c[3][4], "imp:imprint-jax-src.tar.gz",
                  "--zone", "us-east5-a", "--worker=all"]
  assert ssh_commands(env) == [("--worker=all", SETUP), ("--worker=all", START),
                               ("--worker=0", "tail -n +1 -F imprint-jax/run.log")]
  # The worker's shell hands the command to imprint-jax exactly as it was typed here.
  assert shlex.split(START)[6:] == TRAIN[1:] + ["--distributed", "--resume"]
  with tarfile.open(env["fake"] / "shipped.tar.gz") as t:
    names = sorted(t.getnames())
    shipped = t.extractfile(".imprint-shipped").read().decode()
  assert names == [".gitignore", ".imprint-shipped", "configs/stage1.py", "launch_tpu.sh",
                   "requirements.lock"]
  assert "uncommitted changes: 0" in shipped


def test_ready_slice_is_reused(env):
  state(env, vm=["READY"])
  r = launch(env, "run", *LOC, "--type", "v6e-64", "--bucket", "bkt", "--no-follow", *TRAIN)
  assert r.returncode == 0, r.stderr
  assert verbs(env) == ["tpu-vm describe", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]
  assert ssh_commands(env)[1] == ("--worker=all", START)


def test_preempted_spot_vm_is_recreated_and_resumes(env):
  state(env, vm=["PREEMPTED"])
  r = launch(env, "run", *LOC, "--type", "v5litepod-16", "--spot", "--bucket", "bkt",
             "--no-follow", *TRAIN)
  assert r.returncode == 0, r.stderr
  assert verbs(env) == ["tpu-vm describe", "tpu-vm delete", "tpu-vm create", "tpu-vm describe",
                        "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]
  c = calls(env)
  assert c[1] == ["compute", "tpus", "tpu-vm", "delete", "imp", "--zone", "us-east5-a", "--quiet"]
  assert c[2][-5:] == ["--accelerator-type", "v5litepod-16", "--version", "v2-alpha-tpuv5-lite",
                       "--spot"]
  assert ssh_commands(env)[1] == ("--worker=all", START)


@pytest.mark.parametrize("dead", ["SUSPENDED", "FAILED"])
def test_dead_queued_resource_is_recreated_waited_for_and_resumes(env, dead):
  state(env, qr=[dead], qr_after_create=["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
  r = launch(env, "run", *LOC, "--type", "v5p-16", "--queued", "--spot", "--bucket", "bkt",
             "--poll", "0", "--no-follow", "--project", "proj", *TRAIN)
  assert r.returncode == 0, r.stderr
  assert verbs(env) == ["queued-resources describe", "queued-resources delete",
                        "queued-resources create", "queued-resources describe",
                        "queued-resources describe", "queued-resources describe", "tpu-vm scp",
                        "tpu-vm ssh", "tpu-vm ssh"]
  c = calls(env)
  loc = ["--zone", "us-east5-a", "--project", "proj"]
  assert c[1] == ["compute", "tpus", "queued-resources", "delete", "imp", *loc, "--force",
                  "--quiet"]
  assert c[2] == ["compute", "tpus", "queued-resources", "create", "imp", *loc, "--node-id",
                  "imp", "--accelerator-type", "v5p-16", "--runtime-version", "v2-alpha-tpuv5",
                  "--spot"]
  assert c[3][-1] == "--format=value(state.state)"
  assert ssh_commands(env)[1] == ("--worker=all", START)


def test_watch_recreates_a_preempted_slice_and_exits_with_the_jobs_status(env):
  # Up at start; preempted at the first check; back up and the job running at the second;
  # at the third the job has exited with status 0.
  state(env, vm=["READY", "PREEMPTED"])
  (env["fake"] / "worker_status").write_text("w0: running (pid 12)\nw0: exited 0\n")
  r = launch(env, "run", *LOC, "--type", "v4-32", "--watch", "--poll", "0", *TRAIN)
  assert r.returncode == 0, r.stderr
  assert verbs(env) == ["tpu-vm describe", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh",  # start
                        "tpu-vm describe",                                            # preempted
                        "tpu-vm describe", "tpu-vm delete", "tpu-vm create", "tpu-vm describe",
                        "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh",                     # again
                        "tpu-vm describe", "tpu-vm ssh",                              # running
                        "tpu-vm describe", "tpu-vm ssh"]                              # exited 0
  starts = [cmd for _, cmd in ssh_commands(env) if "_worker start" in cmd]
  assert len(starts) == 2 and all(cmd.endswith("--distributed --resume") for cmd in starts)
  assert "the job ended with exit status 0" in r.stdout


def test_watch_exits_with_a_failed_jobs_status(env):
  state(env, vm=["READY"])
  (env["fake"] / "worker_status").write_text("w0: exited 3\n")
  r = launch(env, "run", *LOC, "--type", "v4-8", "--watch", "--poll", "0", *TRAIN)
  assert r.returncode == 3


def test_other_commands_run_as_given_and_fresh_drops_resume(env):
  state(env, vm=["READY"])
  r = launch(env, "run", *LOC, "--type", "v6e-8", "--worker", "0", "--no-follow", "--",
             "composite", "--ckpt", "gs://bkt/runs/s2", "--manifest", "/gcs/bkt/jobs.jsonl",
             "--out", "gs://bkt/results")
  assert r.returncode == 0, r.stderr
  assert ssh_commands(env)[-1] == (
      "--worker=0", "bash imprint-jax/src/launch_tpu.sh _worker start none -- composite --ckpt"
      " gs://bkt/runs/s2 --manifest /gcs/bkt/jobs.jsonl --out gs://bkt/results")
  (env["fake"] / "calls").unlink()
  r = launch(env, "run", *LOC, "--type", "v6e-8", "--fresh", "--jax-cache", "gs://c/x",
             "--no-follow", "--", "train", "--config", "configs/stage1.py", "--workdir", "gs://b/r")
  assert r.returncode == 0, r.stderr
  assert ssh_commands(env)[-1][1].endswith(
      "_worker start gs://c/x -- train --config configs/stage1.py --workdir gs://b/r --distributed")


def test_dirty_tree_is_shipped_as_it_is_or_refused(env):
  repo = env["repo"]
  (repo / "configs" / "stage1.py").write_text("# edited, not committed\n")
  (repo / "new_file.py").write_text("x = 1\n")
  (repo / "ignored").mkdir()
  (repo / "ignored" / "big.bin").write_text("no")
  (repo / "requirements.lock").unlink()
  state(env, vm=["READY"])
  r = launch(env, "create", *LOC, "--type", "v4-8")
  assert r.returncode == 0, r.stderr
  assert "with 3 uncommitted change(s)" in r.stdout
  with tarfile.open(env["fake"] / "shipped.tar.gz") as t:
    assert sorted(t.getnames()) == [".gitignore", ".imprint-shipped", "configs/stage1.py",
                                    "launch_tpu.sh", "new_file.py"]
    assert t.extractfile("configs/stage1.py").read() == b"# edited, not committed\n"
    shipped = t.extractfile(".imprint-shipped").read().decode().splitlines()
  assert shipped[1:] == ["uncommitted changes: 3", " M configs/stage1.py",
                         " D requirements.lock", "?? new_file.py"]
  (env["fake"] / "calls").unlink()
  r = launch(env, "run", *LOC, "--type", "v4-8", "--require-clean", *TRAIN)
  assert r.returncode == 2
  assert r.stderr.splitlines() == [
      "launch_tpu.sh: error: the working tree has 3 uncommitted change(s) (git status); commit"
      " them or drop --require-clean"]
  assert calls(env) == []


def test_dry_run_prints_every_gcloud_command_and_runs_none(env):
  r = launch(env, "run", *LOC, "--type", "v5p-128", "--queued", "--spot", "--bucket", "bkt",
             "--dry-run", *TRAIN, gcloud=False)  # no gcloud on PATH at all
  assert r.returncode == 0, r.stderr
  printed = [line for line in r.stdout.splitlines() if line.startswith("gcloud ")]
  assert printed[:2] == [
      "gcloud compute tpus queued-resources describe imp --zone us-east5-a"
      " '--format=value(state.state)'",
      "gcloud compute tpus queued-resources create imp --zone us-east5-a --node-id imp"
      " --accelerator-type v5p-128 --runtime-version v2-alpha-tpuv5 --spot"]
  assert printed[2].startswith("gcloud compute tpus tpu-vm scp ")
  assert printed[3].endswith("_worker setup bkt 40000'")
  assert "_worker start gs://bkt/jax-cache -- train" in printed[4]
  assert printed[5].endswith("--worker=0 --command 'tail -n +1 -F imprint-jax/run.log'")
  assert len(printed) == 6
  assert not (env["fake"] / "calls").exists()


@pytest.mark.parametrize("args", [
    [],
    ["launch"],
    ["run", *LOC, "--type", "v5p-8"],                       # no command after --
    ["run", "--zone", "z", "--type", "v5p-8", *TRAIN],       # no --name
    ["create", "--name", "imp", "--type", "v5p-8"],          # no --zone
    ["create", *LOC],                                        # no --type
    ["create", *LOC, "--type", "v9-8"],                      # no default version
    ["create", *LOC, "--type", "v5p-8", "--frobnicate"],
    ["logs", *LOC, "--poll", "soon"],
    ["logs", "--zone", "z", "--name"],                       # --name without its value
    ["create", *LOC, "--type", "v5p-8", "--bucket", "gs://bkt"],
    ["stop", *LOC, "--", "train"],
])
def test_bad_arguments_give_one_error_line_and_exit_2(env, args):
  r = launch(env, *args)
  assert r.returncode == 2
  assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("launch_tpu.sh: error: ")
  assert calls(env) == []


@pytest.mark.parametrize("verb,queued,expected", [
    ("logs", False, [["compute", "tpus", "tpu-vm", "ssh", "imp", "--zone", "us-east5-a",
                      "--worker=2", "--command", "tail -n +1 -F imprint-jax/run.log"]]),
    ("stop", False, [["compute", "tpus", "tpu-vm", "ssh", "imp", "--zone", "us-east5-a",
                      "--worker=all", "--command", "bash imprint-jax/src/launch_tpu.sh _worker stop"]]),
    ("delete", False, [["compute", "tpus", "tpu-vm", "delete", "imp", "--zone", "us-east5-a",
                        "--quiet"]]),
    ("delete", True, [["compute", "tpus", "queued-resources", "delete", "imp", "--zone",
                       "us-east5-a", "--force", "--quiet"]]),
])
def test_logs_stop_delete(env, verb, queued, expected):
  extra = (["--worker", "2"] if verb == "logs" else []) + (["--queued"] if queued else [])
  r = launch(env, verb, *LOC, *extra)
  assert r.returncode == 0, r.stderr
  assert calls(env) == expected


# ------------------------------------------------------------------------------ worker side

def test_worker_start_status_stop(tmp_path):
  """The commands `run`, `status` and `stop` send to each worker, run here with HOME in tmp."""
  root = tmp_path / "imprint-jax"
  (root / "venv" / "bin").mkdir(parents=True)
  (root / "src").mkdir()
  shutil.copy(SCRIPT, root / "src" / "launch_tpu.sh")
  stand_in = root / "venv" / "bin" / "imprint-jax"
  stand_in.write_text("#!/usr/bin/env bash\n"
                      'echo "args: $* | cache: ${JAX_COMPILATION_CACHE_DIR:-unset} | cwd: $PWD"\n'
                      "trap 'echo saving; exit 7' TERM\n"
                      "for i in $(seq 300); do sleep 0.1; done\n")
  stand_in.chmod(0o755)

  def worker(*args):
    return subprocess.run(["bash", "imprint-jax/src/launch_tpu.sh", "_worker", *args],
                          cwd=tmp_path, env={**os.environ, "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=30)

  def wait_for(pred):
    for _ in range(100):
      if pred():
        return
      time.sleep(0.05)
    raise AssertionError("timed out")

  assert worker("status").stdout.endswith(": no job\n")
  r = worker("start", "gs://bkt/jax-cache", "--", "train", "--set", "a=(1, 2)")
  assert r.returncode == 0, r.stderr
  wait_for(lambda: (root / "run.pid").exists() and "args:" in (root / "run.log").read_text())
  assert "running (pid" in worker("status").stdout
  r = worker("start", "none", "--", "train")
  assert r.returncode == 3 and "a job is already running" in r.stderr
  r = worker("setup", "", "0")   # refuses to replace the tree under a running job
  assert r.returncode == 3 and "a job is running" in r.stderr
  assert "sent SIGTERM" in worker("stop").stdout
  wait_for(lambda: (root / "run.rc").exists())
  assert worker("status").stdout.endswith(": exited 7\n")
  log = (root / "run.log").read_text().splitlines()
  assert log[0].endswith(" imprint-jax train --set a=(1, 2)")
  assert log[1:] == [f"args: train --set a=(1, 2) | cache: gs://bkt/jax-cache | cwd: {root}/src",
                     "saving"]


STUB = """#!/usr/bin/env bash
# One write per call: the two sides of a pipeline record at the same time.
line=$(printf '%s\\x1f' "$(basename "$0")" "$@"); printf '%s\\n' "$line" >> "$STUB_LOG"
"""


def test_worker_setup_installs_python_and_package_and_mounts_the_bucket(tmp_path):
  """`_worker setup` with stand-ins for uv, sudo, apt-get, curl, gcsfuse: the commands it runs."""
  root = tmp_path / "imprint-jax"
  (root / "incoming").mkdir(parents=True)
  shutil.copy(SCRIPT, root / "incoming" / "launch_tpu.sh")
  (root / "src").mkdir()
  (root / "src" / "stale.py").write_text("old tree\n")
  bin_ = tmp_path / "bin"
  bin_.mkdir()
  log = tmp_path / "stub.log"
  stubs = {
      "uv": STUB + 'if [[ "$1" == venv ]]; then v="${@: -1}"; mkdir -p "$v/bin";'
            ' cp "$0.python" "$v/bin/python"; fi\n',
      "uv.python": "#!/usr/bin/env bash\necho stub-python\n",
      # sudo runs nothing: it records, swallows stdin, and "installs" gcsfuse when asked to.
      "sudo": STUB + 'cat >/dev/null </dev/stdin 2>/dev/null || true\n'
              'if [[ "$*" == *"install -y -qq gcsfuse"* ]]; then cp "$0.gcsfuse" "$(dirname "$0")/gcsfuse";'
              ' chmod +x "$(dirname "$0")/gcsfuse"; fi\n',
      "sudo.gcsfuse": STUB,
      "curl": STUB + "echo KEY\n",
      "lsb_release": STUB + "echo jammy\n",
      "mountpoint": STUB + "exit 1\n",
  }
  for name, text in stubs.items():
    (bin_ / name).write_text(text)
    (bin_ / name).chmod(0o755)
  r = subprocess.run(["bash", "imprint-jax/incoming/launch_tpu.sh", "_worker", "setup", "bkt",
                      "5000"], cwd=tmp_path, capture_output=True, text=True, timeout=30,
                     env={**os.environ, "HOME": str(tmp_path), "STUB_LOG": str(log),
                          "PATH": f"{bin_}:{os.environ['PATH']}"})
  assert r.returncode == 0, r.stderr
  assert r.stdout.endswith("ready (stub-python, stub-python)\n")
  assert sorted(p.name for p in root.iterdir()) == ["gcsfuse-cache", "src", "venv"]
  assert (root / "src" / "launch_tpu.sh").exists() and not (root / "src" / "stale.py").exists()
  ran = [line.split(SEP)[:-1] for line in log.read_text().splitlines()]
  ran[4:6] = sorted(ran[4:6])   # the two sides of one pipeline start in either order
  assert ran == [
      ["uv", "python", "install", "3.11"],
      ["uv", "venv", "-q", "--python", "3.11", "venv"],
      ["uv", "pip", "install", "-q", "--python", "../venv/bin/python", "-c", "requirements.lock",
       ".[tpu]"],
      ["lsb_release", "-cs"],
      *sorted([["curl", "-fsSL", "https://packages.cloud.google.com/apt/doc/apt-key.gpg"],
               ["sudo", "tee", "/usr/share/keyrings/cloud.google.asc"]]),
      ["sudo", "tee", "/etc/apt/sources.list.d/gcsfuse.list"],
      ["sudo", "apt-get", "update", "-qq"],
      ["sudo", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-qq", "gcsfuse"],
      ["mountpoint", "-q", "/gcs/bkt"],
      ["sudo", "mkdir", "-p", "/gcs/bkt"],
      ["sudo", "chown", f"{os.getuid()}:{os.getgid()}", "/gcs/bkt"],
      ["gcsfuse", "-o", "ro", "--implicit-dirs", "--metadata-cache-ttl-secs=-1",
       "--stat-cache-max-size-mb=-1", "--type-cache-max-size-mb=-1",
       "--kernel-list-cache-ttl-secs=-1", f"--cache-dir={root}/gcsfuse-cache",
       "--file-cache-max-size-mb=5000", "--file-cache-cache-file-for-range-read=true", "bkt",
       "/gcs/bkt"],
  ]
