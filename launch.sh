#!/usr/bin/env bash
# One entry point: demo, tests, training.
#   ./launch.sh demo                      tiny Gemma4 + synthetic MedPix data, CPU, TP2 x PP2 under accelerate
#   ./launch.sh test [pytest args]        the CPU test suite
#   ./launch.sh test-oldest [pytest args] the compatibility subset on the oldest supported transformers (own venv)
#   ./launch.sh train RECIPE [--cluster FILE] [--launcher accelerate|deepspeed] [--hostfile FILE] [--port P]
#                            [--machine_rank N --main_process_ip IP] [--set k=v ...]   (paths relative to the repo)
#   ./launch.sh install                   install the runner and its dependencies into the current Python
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
# DeepSpeed's CPU op builds here, not in ~/.cache/torch_extensions that other checkouts' venvs rebuild in turns
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}

install() {
    if command -v runner >/dev/null \
        && "$PY" -c "import runner, deepspeed, torchvision, accelerate, datasets, transformers.models.gemma4" 2>/dev/null; then
        return  # (the import alone succeeds from the repo root, where the `runner` command may still be missing)
    fi
    if [ "$(uname -m)" = "x86_64" ] && ! "$PY" -c "import torchvision" 2>/dev/null; then
        # torch and torchvision that import together (PyPI's torchvision does not import beside the
        # machine's CPU torch 2.13); pip takes both from its index or a local wheel cache.
        "$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
    fi
    "$PY" -m pip install -q -e ".[test]"
}

cluster_value() {  # cluster_value FILE a.b: a (dotted) key of an accelerate config, empty if absent
    "$PY" -c "
import sys, yaml
node = yaml.safe_load(open(sys.argv[1]))
for part in sys.argv[2].split('.'):
    node = node.get(part, '') if isinstance(node, dict) else ''
print(node)" "$1" "$2"
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
    local recipe=${1:?usage: ./launch.sh train RECIPE [--cluster FILE] [--launcher accelerate|deepspeed] [--hostfile FILE] [--set k=v ...]}
    shift
    local cluster=accelerate_configs/cpu_4proc.yaml launcher=accelerate hostfile="" port=29500 extra=() node=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --cluster) cluster=$2; shift 2 ;;
            --launcher) launcher=$2; shift 2 ;;
            --hostfile) hostfile=$2; shift 2 ;;
            --port) port=$2; shift 2 ;;
            --machine_rank|--main_process_ip) node+=("$1" "$2"); shift 2 ;;  # multi-node accelerate, per node
            *) extra+=("$1"); shift ;;
        esac
    done
    [ -f "$cluster" ] || { echo "error: cluster config $cluster not found (see accelerate_configs/)" >&2; exit 2; }
    if [ "$(cluster_value "$cluster" use_cpu)" = "True" ]; then
        export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
    fi
    # a bad recipe, --set, model, data, output dir or checkpoint: one line and exit 2 here, not once per process
    "$PY" -m runner train "$recipe" --check --world-size "$(cluster_value "$cluster" num_processes)" \
        ${extra[@]+"${extra[@]}"}
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
        *) echo "error: --launcher must be accelerate or deepspeed, got $launcher" >&2; exit 2 ;;
    esac
}

demo() {
    install
    local dir=runs/demo
    [ -f "$dir/gemma4-tiny/config.json" ] || "$PY" -m runner make-tiny "$dir/gemma4-tiny"
    [ -d "$dir/medpix-synthetic" ] || "$PY" -m runner make-data "$dir/medpix-synthetic" --n 200
    rm -rf "$dir/output"  # a fresh run each time (resume: auto would otherwise continue the last one)
    # trained on the prompt `runner evaluate` sends: the generation prompt's empty thinking channel, masked
    (train recipes/tiny_demo.yaml --cluster accelerate_configs/cpu_4proc.yaml --set data.thinking_prefix=true ${@+"$@"})
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

test_oldest() {  # the `compat`-marked tests in .venv-oldest, on the lowest transformers pyproject allows
    local oldest venv=.venv-oldest
    oldest=$("$PY" -c "
import re, tomllib
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']
print(re.search(r'>=([0-9.]+)', next(d for d in deps if d.startswith('transformers'))).group(1))")
    if ! "$venv/bin/python" -c "import sys, transformers, packaging.version as v
sys.exit(v.Version(transformers.__version__) != v.Version('$oldest'))" 2>/dev/null; then
        echo "test-oldest: installing transformers $oldest into $venv" >&2
        "$PY" -m venv "$venv"
        [ "$(uname -m)" = "x86_64" ] && "$venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
        "$venv/bin/python" -m pip install -q -e ".[test]" "transformers==$oldest"
    fi
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=$PWD/$venv/torch_extensions
    exec "$venv/bin/python" -m pytest -q -m compat tests "$@"
}

cmd=${1:-}
shift || true
case "$cmd" in
    install) install ;;
    test)
        install
        export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
        exec "$PY" -m pytest -q tests "$@" ;;
    test-oldest) test_oldest "$@" ;;
    train) train "$@" ;;
    demo) demo "$@" ;;
    *) sed -n '2,8p' "$0" >&2; exit 2 ;;
esac
