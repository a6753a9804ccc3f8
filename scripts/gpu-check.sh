#!/usr/bin/env bash
# The GPU check: the two protocol-preset benchmarks and the CUDA tests (tests/test_cuda.py), summed up
# in one JSON file, gpu-check.json (see docs/gpu.md).
#
#   bash scripts/gpu-check.sh [FOLDER] [PYTEST ARGS...]
#
# FOLDER (default: $OUT, else the repository root) receives gpu-check.json and, in gpu-check/, the
# pieces: bench-eval.json, bench-train.json, tests.xml (JUnit), the logs and seconds.txt. PYTEST ARGS
# go to pytest (say -k "not pipeline"). The summary is rewritten after each part, so a run cut short
# leaves what it measured. Exit status 0: the tests pass and the acceptance figures are met.
set -euo pipefail

here=$PWD
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-${OUT:-$root}}
shift || true
case $out in /*) ;; *) out="$here/$out" ;; esac
parts="$out/gpu-check"
python=${PYTHON:-$(command -v python || command -v python3 || echo python)}
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

# missing packages and how to carry them; no CUDA GPU: one line, exit 1
"$python" scripts/gpu_check.py preflight
mkdir -p "$parts"
rm -f "$parts"/bench-eval.json "$parts"/bench-train.json "$parts"/tests.xml "$parts"/seconds.txt

summarise() {
    "$python" scripts/gpu_check.py summary "$parts" "$out/gpu-check.json"
}

for bench in eval train; do
    echo "gpu-check: clso bench $bench --preset protocol --device cuda" >&2
    start=$SECONDS
    if ! "$python" -m cli bench "$bench" --preset protocol --device cuda \
            >"$parts/bench-$bench.json" 2>"$parts/bench-$bench.log"; then
        echo "gpu-check: clso bench $bench failed: see $parts/bench-$bench.log" >&2
        rm -f "$parts/bench-$bench.json"
    fi
    echo "bench_$bench $((SECONDS - start))" >>"$parts/seconds.txt"
    summarise >/dev/null || true
done

echo "gpu-check: python -m pytest -m cuda tests/test_cuda.py $*" >&2
start=$SECONDS
"$python" -m pytest -m cuda tests/test_cuda.py --junitxml "$parts/tests.xml" "$@" 2>&1 | tee "$parts/tests.log" || true
echo "tests $((SECONDS - start))" >>"$parts/seconds.txt"
summarise
