#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md, for a GPU machine whose Python already has JAX with CUDA (and flax, optax,
# orbax, numpy, ...) but not the rest of moescale's dependencies, and no network.
#
#   bash benchmarks/gpu.sh wheels        # on a machine with the package registries: the missing wheels into .whl/
#   bash benchmarks/gpu.sh PART [OUTDIR] # on the GPU machine, with .whl/ beside it; results under OUTDIR
#   bash benchmarks/gpu.sh exec OUTDIR COMMAND...  # any command there with the same set-up, e.g.
#       bash benchmarks/gpu.sh exec "$OUT" python3 -m moescale.cli study studies/x.yaml --out studies/x
#
# PART is one of
#   check       imports every module the other parts use, lists the presets and trains two tiny runs (compiled
#               trainer on CartPole, 2 seeds; host trainer on gym:CartPole-v1): a first call, about a minute
#   profile     device time per kernel (benchmarks/kernel_profile.py): dense at 1 and 16 seeds (the preset's
#               matmul convolution), 16 seeds with network.conv=lax, and 16 seeds with 4 environments each
#   throughput  compiled trainer vs host loop at 1 and 16 seeds (1 and 4 environments per seed), lax and
#               matmul convolutions in turns; writes the GPU throughput section
#   atari       host/device Atari trainer at 4 and 8 environments, and 8 with network.conv=matmul, each section
#               in its own markdown file
#   learn       minatar-dqn and minatar-rainbow, dense vs Soft MoE-4 on Breakout and SpaceInvaders, 3 seeds,
#               5M agent steps, stopped after LEARN_SECONDS (default 540) and resumed by running it again on
#               the same machine; finished and partial metrics are copied to OUTDIR
# Every part prints its tables last and leaves its logs, and BENCHMARKS.md with the sections it wrote, in OUTDIR.
set -euo pipefail
cd "$(dirname "$0")/.."

# The dependencies a GPU image with JAX usually lacks, at the versions requirements.lock pins.
WHEELS="ale-py decorator distrax dm-env dm-tree Farama-Notifications gast gymnasium gymnax MinAtar rlax
tfp-nightly"

part=${1:-}
out=${2:-${OUT:-/tmp/moescale-gpu}}

if [[ $part == wheels ]]; then
  pins=()
  for name in $WHEELS; do
    pin=$(grep -i "^${name}==" requirements.lock) || { echo "requirements.lock pins no $name" >&2; exit 2; }
    pins+=("$pin")
  done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${WHEELS_PYTHON:-3.12}" \
    --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
  ls .whl
  exit 0
fi

case $part in check | profile | throughput | atari | learn | exec) ;;
  *) echo "part: expected one of wheels, check, profile, throughput, atari, learn, exec; got '${part}'" >&2; exit 2 ;;
esac
if [[ $part == exec && $# -lt 3 ]]; then
  echo "exec: expected OUTDIR and a command after it" >&2
  exit 2
fi

mkdir -p "$out"
if ! python3 -c "import gymnax, rlax" 2>/dev/null; then
  ls .whl/*.whl > /dev/null || { echo ".whl/ holds no wheels: run 'bash benchmarks/gpu.sh wheels' first" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import jax; print('devices:', jax.devices(), 'jax', jax.__version__)" | tee "$out/devices.txt"

case $part in
  exec)
    shift 2
    "$@" 2>&1 | tee "$out/exec.txt"
    ;;
  check)
    python3 -c "import moescale.train.run, moescale.train.sebulba, moescale.envs.host, moescale.study.runner; print('imports: ok')"
    python3 -m moescale.cli presets
    (cd benchmarks && python3 -c "import throughput, kernel_profile, atari, learning; print('benchmarks: ok')")
    tiny="--preset classic-dqn --seeds 2 --steps 2000 --set iteration_steps=1000 --set agent.min_replay=500 --force"
    # shellcheck disable=SC2086  # $tiny holds several words on purpose
    python3 -m moescale.cli train --env CartPole-v1 $tiny --out "$out/smoke-compiled" > "$out/smoke.txt" 2>&1
    # shellcheck disable=SC2086
    python3 -m moescale.cli train --env gym:CartPole-v1 $tiny --out "$out/smoke-host" >> "$out/smoke.txt" 2>&1
    grep -H -E '"(trainer|device|devices|agent_steps_per_second|mean_final_eval_return)"' "$out"/smoke-*/summary.json
    ;;
  profile)
    for args in "--seeds 1" "--seeds 16" "--seeds 16 --set network.conv=lax" "--seeds 16 --set num_envs=4"; do
      echo "== kernel_profile.py --arch dense $args"
      # shellcheck disable=SC2086  # $args holds several words on purpose
      python3 benchmarks/kernel_profile.py --arch dense --layout vmap --iterations 2 --top 12 $args
    done 2>&1 | tee "$out/profile.txt"
    ;;
  throughput)
    python3 benchmarks/throughput.py --repeats 3 --iteration-steps 4000 --runs 1:auto,16:vmap,16:vmap:4 \
      --conv lax,matmul --write BENCHMARKS.md 2>&1 | tee "$out/throughput.txt"
    cp BENCHMARKS.md "$out/"
    ;;
  atari)
    # Each configuration's section goes to its own file; the one to keep is pasted into BENCHMARKS.md.
    for args in "--envs 4" "--envs 8" "--envs 8 --set network.conv=matmul"; do
      name=$(echo "$args" | tr -c 'a-z0-9\n' '-' | tr -s '-')
      # shellcheck disable=SC2086  # $args holds several words on purpose
      python3 benchmarks/atari.py --calls 50 --repeats 3 $args --write "$out/atari$name.md"
    done 2>&1 | tee "$out/atari.txt"
    ;;
  learn)
    runs=runs/learning-gpu
    status=0
    timeout "${LEARN_SECONDS:-540}" python3 benchmarks/learning.py run --out $runs --steps 5000000 --seeds 3 \
      --presets minatar-dqn,minatar-rainbow --games Breakout,SpaceInvaders > "$out/learn.txt" 2>&1 || status=$?
    tail -c 2000 "$out/learn.txt"
    [[ $status == 124 ]] && echo "stopped after ${LEARN_SECONDS:-540} s: run the part again to go on"
    for run in $runs/*/; do
      mkdir -p "$out/$(basename "$run")"
      cp "$run"/config.yaml "$run"/metrics.csv "$out/$(basename "$run")/" 2>/dev/null || true
    done
    python3 benchmarks/learning.py table $runs --at 1000000,5000000 || true  # fails only before any metrics
    ;;
esac
