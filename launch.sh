#!/usr/bin/env bash
# One entry point for the demo, the tests, installing and training; `./launch.sh --help` lists the commands.
set -euo pipefail
CALLER=$PWD  # the user's paths on the command line are relative to here
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$ROOT"   # the repo's own paths: accelerate configs name their DeepSpeed JSON repo-relative
export TOKENIZERS_PARALLELISM=false
# DeepSpeed's CPU op builds inside the checkout, not in a cache shared with venvs of other torch versions
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}
TORCH=("torch==2.14.1" "torchvision==0.29.1")  # a pair that imports together
CPU_INDEX=https://download.pytorch.org/whl/cpu

usage() {
    cat <<'EOF'
Usage: ./launch.sh COMMAND [ARGS]

Commands:
  demo [--set KEY=VALUE ...]   tiny Gemma4 + synthetic MedPix data on CPU: TP2 x PP2 under accelerate
                               (4 processes), fine-tuned, exported and scored, in runs/demo/
  test [PYTEST ARGS]           the CPU test suite (pytest -q tests; or the tests/ files or ids given)
  test-oldest [PYTEST ARGS]    the compatibility subset on the oldest supported libraries (.venv-oldest)
  train RECIPE [OPTIONS]       check a run once, then start its processes (./launch.sh train --help)
  install                      install the runner, its dependencies and torch (see Python below)
  help                         this text

Python: $PYTHON if set, else the active virtual environment ($VIRTUAL_ENV, or python3 on PATH when
it is a venv's), else .venv in the repository; install, demo and test create .venv when none of these
exists (train and test-oldest then use python3). Without a GPU (no nvidia-smi) on x86_64, torch comes as the CPU build.
Hub: demo, test and test-oldest run offline (HF_HUB_OFFLINE=1); train downloads from the Hub unless
you set HF_HUB_OFFLINE=1.
EOF
}

train_usage() {
    cat <<'EOF'
Usage: ./launch.sh train RECIPE [OPTIONS] [--set KEY=VALUE ...] [runner train options]

Runs `runner train RECIPE --check` once with the cluster's process count (a bad recipe, model, data,
output dir or checkpoint stops here with one line, exit 2), then starts the job under the launcher.

Options:
  --cluster FILE          Accelerate config: process count, machines, DeepSpeed JSON
                          (default accelerate_configs/cpu_4proc.yaml)
  --launcher NAME         accelerate (default) or deepspeed
  --hostfile FILE         deepspeed launcher on several hosts ("node0 slots=8" per line; it ssh's to each)
  --port P                rendezvous port (default 29500): accelerate's --main_process_port,
                          deepspeed's --master_port
  --machine_rank N        multi-node accelerate, on every node: this node's rank
  --main_process_ip IP    multi-node accelerate: node 0's address, reachable from every node
  --set KEY=VALUE         override a recipe key (the value is read as YAML); repeatable
  --check                 only check (once) and print what was checked
  -h, --help              this text

Paths: RECIPE, --cluster, --hostfile and --ds-config are taken relative to the current directory,
else to the repository (its recipes/ and accelerate_configs/). --set data.train, data.eval,
model.path and checkpoint.resume: relative to the current directory when that path exists there
(else a Hub id, or as in a recipe); --set output.dir: relative to the current directory. Relative
paths written inside a recipe resolve against the repository root, where the job runs.

Any other option goes to `runner train` in every process (e.g. --ds-config JSON);
its options: python -m runner train --help
EOF
}

usage_error() {  # usage_error MESSAGE [USAGE LINE]: exit 2
    echo "error: $1" >&2
    [ -n "${2:-}" ] && echo "$2" >&2
    exit 2
}

TRAIN_USAGE="usage: ./launch.sh train RECIPE [--cluster FILE] [--launcher accelerate|deepspeed] [--hostfile FILE] \
[--port P] [--machine_rank N --main_process_ip IP] [--set KEY=VALUE ...] [--check]   (./launch.sh train --help)"

pick_python() {  # PY: $PYTHON, the active venv, the repo's .venv (created when $1 is "create"), else python3
    if [ -n "${PYTHON:-}" ]; then
        PY=$PYTHON
    elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
        PY=$VIRTUAL_ENV/bin/python
    elif python3 -c "import sys; sys.exit(sys.prefix == sys.base_prefix)" 2>/dev/null; then
        PY=python3  # a venv's bin/ first on PATH, not activated
    elif [ -x "$ROOT/.venv/bin/python" ] || [ "${1:-}" = create ]; then
        if [ ! -x "$ROOT/.venv/bin/python" ]; then
            echo "install: creating the virtual environment .venv (python3 -m venv; set PYTHON or activate a venv to use another)" >&2
            python3 -m venv "$ROOT/.venv" || { echo "error: python3 -m venv .venv failed (Debian/Ubuntu: apt install \
python3-venv); or set PYTHON to the interpreter to install into" >&2; exit 1; }
        fi
        PY=$ROOT/.venv/bin/python
        export VIRTUAL_ENV=$ROOT/.venv PATH=$ROOT/.venv/bin:$PATH  # `runner`, and launch.sh run from the tests
    else
        PY=python3
    fi
}

install_torch() {  # install_torch PYTHON: the pinned torch + torchvision on x86_64 unless they import
    local py=$1
    [ "$(uname -m)" = "x86_64" ] || return 0  # elsewhere torch comes with the runner's dependencies
    "$py" -c "import torchvision" 2>/dev/null && return 0
    if ! command -v nvidia-smi >/dev/null; then
        if "$py" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=15)" \
            "$CPU_INDEX" 2>/dev/null; then
            echo "install: ${TORCH[*]}, CPU build (no nvidia-smi here), about 250 MB from $CPU_INDEX" >&2
            "$py" -m pip install "${TORCH[@]}" --index-url "$CPU_INDEX" && return 0
            echo "install: the CPU index failed; trying the default index" >&2
        else
            echo "install: no nvidia-smi here, but the CPU wheels' index $CPU_INDEX is unreachable" >&2
        fi
    fi
    echo "install: ${TORCH[*]} from the default index (on Linux the CUDA build: about 3 GB with its CUDA libraries)" >&2
    "$py" -m pip install "${TORCH[@]}"
}

install() {
    local scripts
    scripts=$("$PY" -c "import sysconfig; print(sysconfig.get_path('scripts'))" 2>/dev/null) || scripts=""
    if [ -x "$scripts/runner" ] \
        && "$PY" -c "import runner, deepspeed, torchvision, accelerate, datasets, transformers.models.gemma4" 2>/dev/null; then
        return  # (the import alone succeeds from the repo root, where the `runner` command may still be missing)
    fi
    echo "install: into $("$PY" -c "import sys; print(sys.prefix)")" >&2
    install_torch "$PY"
    echo "install: the runner and its dependencies (transformers, DeepSpeed, Accelerate, datasets, ...: a few hundred MB)" >&2
    "$PY" -m pip install -e ".[test]"
}

cluster_value() {  # cluster_value FILE a.b: a (dotted) key of an accelerate config, empty if absent
    "$PY" -c "
import sys, yaml
node = yaml.safe_load(open(sys.argv[1]))
for part in sys.argv[2].split('.'):
    node = node.get(part, '') if isinstance(node, dict) else ''
print(node)" "$1" "$2"
}

user_path() {  # user_path P: P against the current directory if it is there, else the repo's, else as given there
    case "$1" in
        /*|"") printf '%s\n' "$1" ;;
        *) if [ -e "$CALLER/$1" ] || [ ! -e "$ROOT/$1" ]; then printf '%s\n' "$CALLER/${1#./}"
           else printf '%s\n' "$ROOT/${1#./}"; fi ;;
    esac
}

user_set() {  # user_set KEY=VALUE: path keys' relative values against the current directory
    local key=${1%%=*} value=${1#*=}
    case "$1" in *=*) ;; *) printf '%s\n' "$1"; return ;; esac
    case "$value" in /*|"") printf '%s\n' "$1"; return ;; esac
    case "$key" in
        data.train|data.eval|model.path|checkpoint.resume)
            [ "$value" != auto ] && [ "$value" != none ] && [ -e "$CALLER/$value" ] && value=$CALLER/${value#./} ;;
        output.dir) value=$CALLER/${value#./} ;;
    esac
    printf '%s=%s\n' "$key" "$value"
}

run_launcher() {  # run_launcher CMD...: exit 2 when a process reported a user error (launchers exit 1 then)
    local marker pid rc=0
    marker=$(mktemp)
    RUNNER_ERROR_FILE=$marker "$@" <&0 &
    pid=$!
    trap 'kill -TERM "$pid" 2>/dev/null' TERM INT  # a scheduler's SIGTERM still reaches the job
    while :; do
        wait "$pid" && rc=0 || rc=$?
        kill -0 "$pid" 2>/dev/null || break  # (a trapped signal interrupts wait; the job goes on)
    done
    [ -s "$marker" ] && rc=2
    rm -f "$marker"
    exit "$rc"
}

train() {
    local recipe="" cluster=$ROOT/accelerate_configs/cpu_4proc.yaml launcher=accelerate hostfile="" port=29500
    local check="" extra=() node=()
    while [ $# -gt 0 ]; do
        case "$1" in  # --opt=value as --opt value
            --cluster=*|--launcher=*|--hostfile=*|--port=*|--machine_rank=*|--main_process_ip=*|--set=*|--ds-config=*)
                set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
        esac
        case "$1" in
            -h|--help) train_usage; exit 0 ;;
            --cluster|--launcher|--hostfile|--port|--machine_rank|--main_process_ip|--set|--ds-config)
                [ $# -ge 2 ] || usage_error "$1 needs a value" "$TRAIN_USAGE" ;;
        esac
        case "$1" in
            --cluster) cluster=$(user_path "$2"); shift 2 ;;
            --launcher) launcher=$2; shift 2 ;;
            --hostfile) hostfile=$(user_path "$2"); shift 2 ;;
            --port) port=$2; shift 2 ;;
            --machine_rank|--main_process_ip) node+=("$1" "$2"); shift 2 ;;  # multi-node accelerate, per node
            --set) extra+=(--set "$(user_set "$2")"); shift 2 ;;
            --ds-config) extra+=(--ds-config "$(user_path "$2")"); shift 2 ;;
            --check) check=1; shift ;;
            -*) extra+=("$1"); shift ;;
            *) if [ -z "$recipe" ]; then recipe=$(user_path "$1"); else extra+=("$1"); fi; shift ;;
        esac
    done
    [ -n "$recipe" ] || usage_error "train needs a RECIPE" "$TRAIN_USAGE"
    [ -f "$recipe" ] || usage_error "recipe $recipe not found (a path from the current directory or the repository, e.g. recipes/tiny_demo.yaml)"
    [ -f "$cluster" ] || usage_error "cluster config $cluster not found (see accelerate_configs/)"
    case "$launcher" in
        accelerate|deepspeed) ;;
        *) usage_error "--launcher must be accelerate or deepspeed, got $launcher" ;;
    esac
    [ -z "$hostfile" ] || [ -f "$hostfile" ] || usage_error "hostfile $hostfile not found"
    pick_python
    if [ "$(cluster_value "$cluster" use_cpu)" = "True" ]; then
        export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
    fi
    # a bad recipe, --set, model, data, output dir or checkpoint: one line and exit 2 here, not once per process
    "$PY" -m runner train "$recipe" --check --world-size "$(cluster_value "$cluster" num_processes)" \
        ${extra[@]+"${extra[@]}"}
    [ -z "$check" ] || exit 0
    case "$launcher" in
        accelerate)
            run_launcher "$PY" -m accelerate.commands.launch --config_file "$cluster" --main_process_port "$port" \
                ${node[@]+"${node[@]}"} -m runner train "$recipe" ${extra[@]+"${extra[@]}"} ;;
        deepspeed)
            # one host: its share of the cluster's processes; several: the hostfile says (DeepSpeed ssh's to each)
            local per_node=$(( $(cluster_value "$cluster" num_processes) / $(cluster_value "$cluster" num_machines) ))
            local where=(--num_gpus "$per_node")
            [ -n "$hostfile" ] && where=(--hostfile "$hostfile")
            run_launcher "$PY" -m deepspeed.launcher.runner "${where[@]}" --master_port "$port" --module runner train "$recipe" \
                --ds-config "$(cluster_value "$cluster" deepspeed_config.deepspeed_config_file)" \
                ${extra[@]+"${extra[@]}"} ;;
    esac
}

demo() {
    pick_python create
    install
    local dir=${DEMO_DIR:-runs/demo} own=()  # DEMO_DIR: an absolute folder of its own (the tests use one)
    [ -n "${DEMO_DIR:-}" ] && own=(--set model.path="$dir/gemma4-tiny" --set data.train="$dir/medpix-synthetic"
                                   --set output.dir="$dir/output")
    [ -f "$dir/gemma4-tiny/config.json" ] || "$PY" -m runner make-tiny "$dir/gemma4-tiny"
    [ -d "$dir/medpix-synthetic" ] || "$PY" -m runner make-data "$dir/medpix-synthetic" --n 200
    rm -rf "$dir/output"  # a fresh run each time (resume: auto would otherwise continue the last one)
    # trained on the prompt `runner evaluate` sends: the generation prompt's empty thinking channel, masked
    (train "$ROOT/recipes/tiny_demo.yaml" --cluster "$ROOT/accelerate_configs/cpu_4proc.yaml" \
        --set data.thinking_prefix=true ${own[@]+"${own[@]}"} ${@+"$@"})
    "$PY" - "$dir/output" <<'PY'
import json, sys
from pathlib import Path
from transformers import AutoModelForImageTextToText
out = Path(sys.argv[1])
losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"split"' not in l]
model = AutoModelForImageTextToText.from_pretrained(out / "export")
n = sum(p.numel() for p in model.parameters())
print(f"demo: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps; "
      f"exported model loads in transformers ({n / 1e6:.2f} M parameters) from {out / 'export'}")
PY
    "$PY" - "$dir" <<'PY'
import sys
from pathlib import Path
from runner.evaluate import run_evaluation, summary_line
demo = Path(sys.argv[1])  # greedy answers on the synthetic validation split, before and after fine-tuning
base, tuned = (summary_line(run_evaluation(str(demo / model), str(demo / "medpix-synthetic"), "validation",
                                           demo / "eval" / name, batch_size=4))
               for name, model in (("base", "gemma4-tiny"), ("fine-tuned", "output/export")))
print(f"demo: base {base} -> fine-tuned {tuned} (answers in {demo / 'eval'})")
PY
}

test_paths() {  # test_paths PYTEST ARGS: "tests" unless the arguments name test files or folders themselves
    local a
    for a in "$@"; do
        case "$a" in -*) ;; *) [ -e "${a%%::*}" ] && return ;; esac
    done
    echo tests
}

test_oldest() {  # the `compat`-marked tests in .venv-oldest, on the lowest release pyproject allows of each library
    local pins venv=.venv-oldest
    pick_python
    # transformers, PEFT, DeepSpeed, Accelerate, datasets: the libraries whose APIs and internals the runner
    # uses, each at its lower bound (torch stays the installed build: older ones are not on every index)
    pins=$("$PY" -c "
import re, tomllib
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']
lows = {m[1]: m[2] for d in deps if (m := re.match(r'([a-z]+)>=([0-9.]+)', d))}
print(' '.join(f'{n}=={lows[n]}' for n in ('transformers', 'peft', 'deepspeed', 'accelerate', 'datasets')))")
    if ! "$venv/bin/python" -c "import sys, importlib.metadata as m, packaging.version as v
sys.exit(any(v.Version(m.version(n)) != v.Version(want) for n, want in (p.split('==') for p in '$pins'.split())))" \
            2>/dev/null; then
        echo "test-oldest: creating $venv with $pins" >&2
        "$PY" -m venv "$venv"
        install_torch "$venv/bin/python"
        echo "install: the runner and its dependencies at their lower bounds (a few hundred MB)" >&2
        # shellcheck disable=SC2086  # $pins: one word per requirement
        "$venv/bin/python" -m pip install -e ".[test]" $pins
    fi
    # VIRTUAL_ENV and PATH: the launchers the tests start (launch.sh, deepspeed, accelerate) run this venv too
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=$ROOT/$venv/torch_extensions \
        VIRTUAL_ENV=$ROOT/$venv PATH=$ROOT/$venv/bin:$PATH
    local where
    where=$(test_paths "$@")
    exec "$venv/bin/python" -m pytest -q -m compat ${where:+"$where"} "$@"
}

cmd=${1:-}
shift || true
case "$cmd" in
    -h|--help|help) usage ;;
    "") usage >&2; exit 2 ;;
    install|demo)
        case "${1:-}" in -h|--help) usage; exit 0 ;; esac
        if [ "$cmd" = install ]; then pick_python create; install
        else export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}; demo "$@"; fi ;;
    test)
        pick_python create
        install
        export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
        where=$(test_paths "$@")
        exec "$PY" -m pytest -q ${where:+"$where"} "$@" ;;
    test-oldest) export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}; test_oldest "$@" ;;
    train) train "$@" ;;
    *) echo "error: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
esac
