"""launch.sh as a user meets it: usage and exit codes, paths relative to where the user stands, the
Hub left online for training, the install steps; and `--check` through it from another directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, subprocess_env

LAUNCH = str(ROOT / "launch.sh")
DEMO = ROOT / "recipes" / "tiny_demo.yaml"


def launch(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`/repo/launch.sh ARGS` from `cwd`, with this test's interpreter (launch.sh never makes a venv here)."""
    env = dict(subprocess_env(), PYTHON=sys.executable) if env is None else env
    return subprocess.run([LAUNCH, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,code", [([], 2), (["--help"], 0), (["-h"], 0), (["help"], 0), (["bogus"], 2),
                                       (["demo", "--help"], 0), (["install", "--help"], 0)])
def test_usage_text_and_exit_codes(tmp_path, args, code):
    proc = launch(*args, cwd=tmp_path)
    assert proc.returncode == code, proc.stderr
    text = proc.stdout if code == 0 else proc.stderr
    assert text.startswith("Usage: ./launch.sh COMMAND") or text.startswith("error: unknown command 'bogus'"), text
    for command in ("demo", "test", "test-oldest", "train RECIPE", "install", "HF_HUB_OFFLINE"):
        assert command in text, (command, text)
    assert "#" not in text  # not the script's comments


def test_train_help_lists_the_wrappers_options_once(tmp_path):
    proc = launch("train", str(DEMO), "--cluster", "accelerate_configs/cpu_1proc.yaml", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: ./launch.sh train RECIPE"), proc.stdout
    firsts = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    for option in ("--cluster FILE", "--launcher NAME", "--hostfile FILE", "--port P", "--machine_rank N",
                   "--main_process_ip IP", "--set KEY=VALUE", "--check"):
        assert firsts.count(option.split()[0]) == 1, (option, proc.stdout)
        assert f"  {option}" in proc.stdout, (option, proc.stdout)
    assert proc.stdout.count("runner train --help") == 1, proc.stdout
    assert "relative to the current directory" in proc.stdout


@pytest.mark.parametrize("args,words", [
    ([], ["error: train needs a RECIPE", "usage: ./launch.sh train RECIPE"]),
    (["--set", "train.max_steps=1"], ["error: train needs a RECIPE"]),
    ([str(DEMO), "--cluster"], ["error: --cluster needs a value", "usage: ./launch.sh train RECIPE"]),
    (["missing.yaml"], ["recipe {cwd}/missing.yaml not found"]),
    ([str(DEMO), "--cluster", "none.yaml"], ["cluster config {cwd}/none.yaml not found"]),
    ([str(DEMO), "--launcher", "mpirun"], ["--launcher must be accelerate or deepspeed, got mpirun"]),
])
def test_train_usage_errors_exit_2_before_python(tmp_path, args, words):
    env = dict(subprocess_env(), PYTHON=str(tmp_path / "no-python"))  # none of these may need one
    proc = launch("train", *args, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "line " not in proc.stderr, proc.stderr
    for w in words:
        assert w.format(cwd=tmp_path) in proc.stderr, (w, proc.stderr)


FAKE_PYTHON = """#!/usr/bin/env bash
# `-c`/`-` snippets run in the real interpreter; anything else is recorded (HF_HUB_OFFLINE, then the arguments)
case "$1" in
    -c|-)
        case "$2" in *deepspeed*) [ -n "${FAKE_INSTALLED:-}" ] && exit 0 ;; esac  # install's check
        case "$2" in *torchvision*) [ -n "${FAKE_NO_TORCH:-}" ] && exit 1 ;; esac
        case "$2" in *urllib*) [ -n "${FAKE_INDEX_DOWN:-}" ] && exit 1; exit 0 ;; esac  # the index probe
        exec REAL "$@" ;;
esac
printf '%s\\n' "HF_HUB_OFFLINE=${HF_HUB_OFFLINE-unset} $*" >> LOG
case "$*" in *--index-url*) [ -n "${FAKE_CPU_INDEX_FAILS:-}" ] && exit 1 ;; esac
exit 0
"""


@pytest.fixture
def fake_python(tmp_path):
    """An interpreter that records what launch.sh runs (its log: `log()`), and runs launch.sh's own snippets."""
    log = tmp_path / "calls.log"
    path = tmp_path / "bin" / "python"
    path.parent.mkdir()
    path.write_text(FAKE_PYTHON.replace("REAL", sys.executable).replace("LOG", str(log)))
    path.chmod(0o755)
    env = {k: v for k, v in subprocess_env().items() if k not in ("HF_HUB_OFFLINE", "VIRTUAL_ENV")}
    env["PYTHON"] = str(path)
    return env, lambda: log.read_text().splitlines() if log.exists() else []


def test_train_resolves_the_users_paths_from_where_they_stand(tmp_path, fake_python):
    """Recipe, cluster, hostfile, --ds-config and the --set path keys that exist relative to the caller
    become absolute (output.dir always); a Hub id and the repo's own recipes and configs stay as they
    are; the Hub stays online for training; the check runs once, then the launcher."""
    env, log = fake_python
    cwd = tmp_path / "work"
    (cwd / "cfg").mkdir(parents=True)
    (cwd / "data" / "medpix").mkdir(parents=True)
    shutil.copy(DEMO, cwd / "cfg" / "recipe.yaml")
    (cwd / "hosts").write_text("localhost slots=4\n")
    proc = launch("train", "cfg/recipe.yaml", "--cluster=accelerate_configs/cpu_1proc.yaml", "--port", "29999",
                  "--set", "data.train=data/medpix", "--set=data.eval=./data/medpix", "--set", "output.dir=runs/x",
                  "--set", "model.path=google/gemma-4-31B-it", "--set", "optim.lr=2e-5", cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stderr
    check, launched = log()
    sets = (f"--set data.train={cwd}/data/medpix --set data.eval={cwd}/data/medpix --set output.dir={cwd}/runs/x "
            f"--set model.path=google/gemma-4-31B-it --set optim.lr=2e-5")
    assert check == f"HF_HUB_OFFLINE=unset -m runner train {cwd}/cfg/recipe.yaml --check --world-size 1 {sets}"
    assert launched == (f"HF_HUB_OFFLINE=unset -m accelerate.commands.launch --config_file "
                        f"{ROOT}/accelerate_configs/cpu_1proc.yaml --main_process_port 29999 "
                        f"-m runner train {cwd}/cfg/recipe.yaml {sets}")

    (tmp_path / "calls.log").unlink()  # the deepspeed launcher: the hostfile; offline when the user says so
    proc = launch("train", "recipes/tiny_demo.yaml", "--launcher", "deepspeed", "--hostfile", "hosts", "--ds-config",
                  "ds_configs/cpu_fp32.json", "--check", cwd=cwd, env=dict(env, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr
    assert log() == [f"HF_HUB_OFFLINE=1 -m runner train {DEMO} --check --world-size 4 "
                     f"--ds-config {ROOT}/ds_configs/cpu_fp32.json"]  # --check: the check alone, once
    (tmp_path / "calls.log").unlink()
    proc = launch("train", str(DEMO), "--launcher", "deepspeed", "--hostfile", "hosts", cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stderr
    assert log()[1].startswith(f"HF_HUB_OFFLINE=unset -m deepspeed.launcher.runner --hostfile {cwd}/hosts "), log()


def test_the_test_command_stays_offline(tmp_path, fake_python):
    env, log = fake_python
    env = dict(env, FAKE_INSTALLED="1")
    proc = launch("test", "-k", "nothing", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    proc = launch("test", "tests/test_launch.py::test_x", "-x", cwd=tmp_path, env=env)  # tests named: only those
    assert proc.returncode == 0, proc.stderr
    assert log() == ["HF_HUB_OFFLINE=1 -m pytest -q tests -k nothing",
                     "HF_HUB_OFFLINE=1 -m pytest -q tests/test_launch.py::test_x -x"]


@pytest.mark.skipif(os.uname().machine != "x86_64" or shutil.which("nvidia-smi") is not None,
                    reason="the CPU wheel index is chosen on x86_64 without nvidia-smi")
@pytest.mark.parametrize("index", ["up", "down", "fails"])
def test_install_takes_cpu_torch_without_a_gpu_and_falls_back_to_the_default_index(tmp_path, fake_python, index):
    env, log = fake_python
    env = dict(env, FAKE_NO_TORCH="1")
    if index == "down":
        env["FAKE_INDEX_DOWN"] = "1"
    if index == "fails":
        env["FAKE_CPU_INDEX_FAILS"] = "1"
    proc = launch("install", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    cpu = ("HF_HUB_OFFLINE=unset -m pip install torch==2.14.1 torchvision==0.29.1 "
           "--index-url https://download.pytorch.org/whl/cpu")
    plain = "HF_HUB_OFFLINE=unset -m pip install torch==2.14.1 torchvision==0.29.1"
    runner = "HF_HUB_OFFLINE=unset -m pip install -e .[test]"
    assert log() == {"up": [cpu, runner], "down": [plain, runner], "fails": [cpu, plain, runner]}[index]
    assert "install: the runner and its dependencies" in proc.stderr  # each step says what it installs
    assert ("CPU build" in proc.stderr) == (index != "down")
    assert ("index https://download.pytorch.org/whl/cpu is unreachable" in proc.stderr) == (index == "down")


def test_check_from_another_directory_finds_relative_recipe_model_and_data(tmp_path, tiny_ckpt):
    """`/repo/launch.sh train cfg/recipe.yaml --check --set data.train=data/medpix ...` from elsewhere:
    one `ok:` line naming what was checked, with the paths resolved where the user stands."""
    from runner.data.synthetic import make_data

    cwd = tmp_path / "work"
    (cwd / "cfg").mkdir(parents=True)
    shutil.copy(DEMO, cwd / "cfg" / "recipe.yaml")
    (cwd / "model").symlink_to(tiny_ckpt, target_is_directory=True)
    make_data(cwd / "data" / "medpix", n=16, seed=0)
    sets = ["model.path=model", "data.train=data/medpix", "data.eval=data/medpix", "output.dir=out"]
    proc = launch("train", "cfg/recipe.yaml", "--check", *[a for s in sets for a in ("--set", s)], cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ok = [line for line in proc.stdout.splitlines() if line.startswith("ok: ")]
    assert len(ok) == 1, proc.stdout
    for words in (f"ok: {cwd}/cfg/recipe.yaml (", f"model {cwd}/model,", f"data {cwd}/data/medpix [train]: 16 samples",
                  "tp*pp=2*2=4 of 4 processes", f"output.dir {cwd}/out writable", "free disk "):
        assert words in ok[0], (words, ok[0])
    assert not (cwd / "out").exists()  # checked, nothing started


def test_python_is_the_active_venvs_without_PYTHON(tmp_path, fake_python):
    """No PYTHON: an activated venv's python, else python3 on PATH when it belongs to a venv (never a new .venv)."""
    env, log = fake_python
    fake = Path(env.pop("PYTHON"))
    (fake.parent / "python3").symlink_to(fake)
    check = [f"HF_HUB_OFFLINE=unset -m runner train {DEMO} --check --world-size 4"]
    proc = launch("train", str(DEMO), "--check", cwd=tmp_path, env=dict(env, VIRTUAL_ENV=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert log() == check
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests' interpreter is not a venv's")
    proc = launch("train", str(DEMO), "--check", cwd=tmp_path, env=dict(env, PATH=f"{fake.parent}:{env['PATH']}"))
    assert proc.returncode == 0, proc.stderr  # (the fake runs snippets in this test's interpreter, a venv's)
    assert log() == check * 2


def test_demo_prints_the_loss_and_base_vs_fine_tuned_scores(tmp_path):
    """The demo's two closing lines, as the README quotes them (a shorter run in a folder of its own)."""
    from conftest import free_port

    env = dict(subprocess_env(), PYTHON=sys.executable, DEMO_DIR=str(tmp_path / "demo"))
    proc = launch("demo", "--port", str(free_port()), "--set", "train.max_steps=4", cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("demo: ")]
    assert len(lines) == 2, proc.stdout[-3000:]
    assert " over 4 steps; exported model loads in transformers (" in lines[0], lines[0]
    assert lines[1].startswith("demo: base EM ") and " -> fine-tuned EM " in lines[1], lines[1]
    assert (tmp_path / "demo" / "eval" / "fine-tuned" / "eval_metrics.json").is_file()
    assert (tmp_path / "demo" / "output" / "metrics.jsonl").is_file()
