#!/usr/bin/env bash
# Peak memory of `tucker-peft extract` and `tucker-peft ranks` on a synthetic
# SHARDED safetensors checkpoint pair of several GB (docs/cli_scale.md).
#
#   bash benchmarks/extract_memory.sh            # defaults below: ~6.2 GB of scratch on $BENCH_DIR (/tmp), ~30 min on 2 cores
#   N_LAYERS=4 bash benchmarks/extract_memory.sh # a quicker, smaller run
#
# Builds BASE and TUNED (N_LAYERS linear weights ROWS x COLS float32, 4 conv
# kernels 256x256x3x3, biases; SHARDS shards + model.safetensors.index.json each;
# TUNED = BASE + a rank-CHANGE_RANK change on every weight), then runs under
# /usr/bin/time -v (or, without it, a Python wrapper reading
# getrusage(RUSAGE_CHILDREN).ru_maxrss):
#   ranks          tucker-peft ranks on BASE (headers only)
#   lora_all       tucker-peft extract --kind lora on every tensor of the pair
#   tucker_convs   tucker-peft extract --kind tucker on the 4 conv kernels only
#   tucker_2big    tucker-peft extract --kind tucker on 2 of the big layers (+ convs):
#                  tucker's HOSVD takes minutes per 4096x8192 layer on 2 cores,
#                  and the peak is per layer, so two layers measure it
# and prints max RSS against the largest layer each run reads and the
# checkpoint size. The big files are deleted on exit; the logs are kept in
# $LOG_DIR (printed at the end).
set -euo pipefail

N_LAYERS=${N_LAYERS:-24}
ROWS=${ROWS:-4096}
COLS=${COLS:-8192}
SHARDS=${SHARDS:-4}
CHANGE_RANK=${CHANGE_RANK:-6}
MATCH=${MATCH:-lora:8}
BENCH_DIR=${BENCH_DIR:-/tmp}

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

# Scratch space: both checkpoints plus 10% slack.
need_kb=$(( (2 * (N_LAYERS * ROWS * COLS * 4 + 4 * 256 * 256 * 9 * 4) / 1024) * 11 / 10 ))
avail_kb=$(df -Pk "$BENCH_DIR" | awk 'NR==2 {print $4}')
echo "scratch: need ~$((need_kb / 1024 / 1024)) GiB, $((avail_kb / 1024 / 1024)) GiB free on $BENCH_DIR"
if (( avail_kb < need_kb )); then
    echo "not enough free space on $BENCH_DIR (set BENCH_DIR or N_LAYERS)" >&2
    exit 1
fi

WORK=$(mktemp -d "$BENCH_DIR/tucker_peft_extract_mem.XXXXXX")
LOG_DIR=${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/tucker_peft_extract_mem_logs.XXXXXX")}
mkdir -p "$LOG_DIR"
trap 'rm -rf "$WORK"' EXIT

if command -v tucker-peft >/dev/null 2>&1; then CLI=(tucker-peft); else CLI=("$PY" -m tucker_peft.cli); fi

if [[ -x /usr/bin/time ]]; then
    TIMER=(/usr/bin/time -v)
    TIMER_NAME="/usr/bin/time -v"
else
    cat > "$WORK/timer.py" <<'EOF'
import resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call(sys.argv[1:])
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"\tElapsed (wall clock) time (h:mm:ss or m:ss): {time.perf_counter() - t:.2f}", file=sys.stderr)
print(f"\tMaximum resident set size (kbytes): {ru.ru_maxrss}", file=sys.stderr)
sys.exit(rc)
EOF
    TIMER=("$PY" "$WORK/timer.py")
    TIMER_NAME="python getrusage(RUSAGE_CHILDREN) wrapper (no /usr/bin/time)"
fi

echo "== building the checkpoints in $WORK"
"$PY" - "$WORK" "$N_LAYERS" "$ROWS" "$COLS" "$SHARDS" "$CHANGE_RANK" <<'EOF'
import json, os, sys, time
import numpy as np
from safetensors.numpy import save_file

work, n_layers, rows, cols, n_shards, rank = sys.argv[1], *map(int, sys.argv[2:])
rng = np.random.default_rng(0)
names = [(f"layers.{i}.mlp.weight", (rows, cols)) for i in range(n_layers)]
names += [(f"layers.{i}.mlp.bias", (rows,)) for i in range(n_layers)]
names += [(f"convs.{i}.weight", (256, 256, 3, 3)) for i in range(4)]
shards = [names[i::n_shards] for i in range(n_shards)]
t0 = time.perf_counter()
for side in ("base", "tuned"):
    os.makedirs(os.path.join(work, side))
wmap = {}
for s, part in enumerate(shards):
    fn = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
    base, tuned = {}, {}
    for name, shape in part:
        b = rng.standard_normal(shape, dtype=np.float32) * 0.02
        base[name] = b
        if len(shape) == 1:
            tuned[name] = b
            continue
        u = rng.standard_normal((shape[0], rank), dtype=np.float32) * 0.01
        v = rng.standard_normal((rank, int(np.prod(shape[1:]))), dtype=np.float32)
        tuned[name] = b + (u @ v).reshape(shape)
    for name, _ in part:
        wmap[name] = fn
    save_file(base, os.path.join(work, "base", fn))
    save_file(tuned, os.path.join(work, "tuned", fn))
    del base, tuned
for side in ("base", "tuned"):
    with open(os.path.join(work, side, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wmap}, f)
print(f"built in {time.perf_counter() - t0:.0f} s")
EOF
du -sh "$WORK/base" "$WORK/tuned"

run() {  # run NAME CMD...: output to $LOG_DIR/NAME.out, timer report to $LOG_DIR/NAME.time
    local name=$1; shift
    echo "== $name: $*"
    "${TIMER[@]}" "$@" > "$LOG_DIR/$name.out" 2> "$LOG_DIR/$name.time"
    grep -E "Maximum resident|Elapsed" "$LOG_DIR/$name.time"
}

BIG2='^layers\.[01]\.mlp\.weight$|^convs\..*weight$'
CONVS='^convs\..*weight$'
run ranks "${CLI[@]}" ranks "$WORK/base" --match "$MATCH"
run tucker_convs "${CLI[@]}" extract "$WORK/base" "$WORK/tuned" --kind tucker --match "$MATCH" --include "$CONVS" \
    -o "$WORK/adapter_tucker_convs" -q
tail -n 1 "$LOG_DIR/tucker_convs.out"
run tucker_2big "${CLI[@]}" extract "$WORK/base" "$WORK/tuned" --kind tucker --match "$MATCH" --include "$BIG2" \
    -o "$WORK/adapter_tucker_2big" -q
tail -n 1 "$LOG_DIR/tucker_2big.out"
run lora_all "${CLI[@]}" extract "$WORK/base" "$WORK/tuned" --kind lora --match "$MATCH" -o "$WORK/adapter_lora" -q
tail -n 1 "$LOG_DIR/lora_all.out"
printf '%s\n' "ranks|" "tucker_convs|$CONVS" "tucker_2big|$BIG2" "lora_all|weight$" > "$LOG_DIR/runs.txt"

echo "== summary (timer: $TIMER_NAME)"
"$PY" - "$WORK" "$LOG_DIR" "$TIMER_NAME" <<'EOF'
import os, platform, re, sys
import numpy, safetensors, tucker_peft
from tucker_peft.cli._checkpoint import open_checkpoint

work, logs, timer = sys.argv[1:]
ck = open_checkpoint(os.path.join(work, "base"))
total = ck.total_nbytes
largest = max(ck.keys(), key=ck.nbytes)
mib = lambda b: b / 2**20

def stat(name, key):
    for line in open(os.path.join(logs, name + ".time")):
        if line.strip().startswith(key):
            return line.rsplit(": ", 1)[1].strip()
    raise KeyError(key)

print(f"checkpoints: 2 x {mib(total):,.0f} MiB in {len(ck.files)} shards each; largest layer {largest} "
      f"{'x'.join(map(str, ck.shape(largest)))} {ck.dtype(largest)} = {mib(ck.nbytes(largest)):,.0f} MiB")
print()
print("| run | max RSS (MiB) | largest layer read (MiB) | tensors read | one checkpoint (MiB) | wall (h:mm:ss) |")
print("|---|---|---|---|---|---|")
for line in open(os.path.join(logs, "runs.txt")):
    name, regex = line.rstrip("\n").split("|", 1)
    read = [k for k in ck.keys() if regex and re.search(regex, k) and len(ck.shape(k)) >= 2]
    layer = max((ck.nbytes(k) for k in read), default=0)
    rss = int(stat(name, "Maximum resident set size")) / 1024
    print(f"| {name} | {rss:,.0f} | {mib(layer):,.1f} | {2 * len(read)} | {mib(total):,.0f} | {stat(name, 'Elapsed')} |")
print()
print(f"python {platform.python_version()}, numpy {numpy.__version__}, safetensors {safetensors.__version__}, "
      f"tucker_peft {tucker_peft.__version__}, {os.cpu_count()} CPUs, {platform.machine()}, "
      f"load average at the end {os.getloadavg()[0]:.1f}")
EOF
echo "logs: $LOG_DIR"
