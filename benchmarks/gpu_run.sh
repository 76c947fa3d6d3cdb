#!/usr/bin/env bash
# Every GPU check in one command, for a machine lent for minutes: the CUDA tests (`-m gpu`),
# then benchmarks/gpu_kernels.py. Results land in $OUT (default ./out): machine.txt, tests.log,
# bench.log, gpu_section.md, gpu_kernels.json, and RESULTS.md: benchmarks/RESULTS.md with its GPU
# section (between its gpu:begin/gpu:end markers) replaced; copy it over benchmarks/RESULTS.md.
#
# Uses the machine's python3 (or $PYTHON) with its torch and triton. Wheels in .whl/ (bitsandbytes, for the
# NF4 comparison) are installed first, without network:
#   pip download --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 \
#       --python-version 3.12 -d .whl bitsandbytes
# Time limits keep the whole run under 10 minutes; the benchmark starts no new shape after
# BENCH_BUDGET seconds and writes its page after every shape.
set -uo pipefail
out=${OUT:-out}
py=${PYTHON:-python3}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    "$py" -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" 2>&1 | tail -1
} | tee "$out/machine.txt"

timeout "${TEST_LIMIT:-180}" "$py" -m pytest -m gpu -q -p no:cacheprovider -rs tests \
    2>&1 | tee "$out/tests.log"
tests=$?

timeout "${BENCH_LIMIT:-390}" "$py" benchmarks/gpu_kernels.py --budget "${BENCH_BUDGET:-300}" \
    --markdown "$out/gpu_section.md" --json "$out/gpu_kernels.json" 2>&1 | tee "$out/bench.log"
bench=$?

"$py" - "$out/gpu_section.md" benchmarks/RESULTS.md "$out/RESULTS.md" <<'SPLICE'
import re, sys
from pathlib import Path

section, page, target = map(Path, sys.argv[1:])
if section.exists():
    text = page.read_text()
    begin, end = "<!-- gpu:begin -->", "<!-- gpu:end -->"
    new = f"{begin}\n{section.read_text().rstrip()}\n{end}"
    Path(target).write_text(re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda m: new, text, flags=re.S))
SPLICE

echo "tests exit $tests, benchmark exit $bench"
exit $((tests != 0 || bench != 0))
