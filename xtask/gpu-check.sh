#!/usr/bin/env bash
# The GPU collector on a real GPU: run on a machine with an NVIDIA GPU, PyTorch and the files
# `cargo xtask gpu-check` prepares in target/gpu-check/ (built elsewhere, carried here):
#   bash xtask/gpu-check.sh            (from the repository's root, as root)
# It runs the real-NVML unit test, then the agent while a PyTorch matmul load holds the GPU,
# and checks: utilisation > 0.5 under load, 0 < power <= limit, the load's pid reported with
# memory > 0. It measures the agent's CPU (whole, and its NVML threads) over 60 s of 1 s
# sampling next to `nvidia-smi dmon -s pucm` and `nvidia-smi --query-gpu=... -l 1` in the same
# window, and prints the cost of each NVML call. Exit status 0 only if every check passed.
set -u
DIR=target/gpu-check
AGENT=$DIR/inferwatch
PORT=19420
SECONDS_MEASURED=${GPU_CHECK_SECONDS:-60}
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:/usr/local/nvidia/lib64
fail=0
check() { # check NAME CONDITION-EXIT-STATUS DETAIL
  if [ "$2" = 0 ]; then echo "PASS  $1  ($3)"; else echo "FAIL  $1  ($3)"; fail=1; fi
}
[ -x "$AGENT" ] || { echo "gpu-check: $AGENT missing: run 'cargo xtask gpu-check' on the build machine and carry $DIR"; exit 2; }
command -v nvidia-smi >/dev/null || { echo "gpu-check: no nvidia-smi: this machine has no NVIDIA driver"; exit 2; }
echo "gpu-check: $(date -u +%FT%TZ) on $(nvidia-smi -L | head -1); driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1); kernel $(uname -r)"

echo "== real-NVML unit test"
"$DIR/inferwatch-unit-tests" --exact collect::nvml::tests::real_nvml_or_a_clear_reason --nocapture 2>&1 | tail -4
check "real-NVML unit test" "${PIPESTATUS[0]}" "collect::nvml::tests::real_nvml_or_a_clear_reason"

echo "== load: PyTorch matmuls on cuda:0"
python3 - <<'PY' &
import time, torch
a = torch.randn(8192, 8192, device="cuda"); b = torch.randn(8192, 8192, device="cuda")
end = time.time() + float(__import__("os").environ.get("GPU_CHECK_LOAD_SECONDS", "150"))
while time.time() < end:
    for _ in range(20):
        c = a @ b
    torch.cuda.synchronize()
PY
LOAD=$!
sleep 8

"$AGENT" --listen 127.0.0.1:$PORT --no-discovery --gpu-interval 1s --log-level info >"$DIR/agent.log" 2>&1 &
AGENT_PID=$!
for _ in $(seq 100); do curl -sf localhost:$PORT/healthz >/dev/null && break; sleep 0.1; done
if ! kill -0 $AGENT_PID 2>/dev/null; then
  check "agent starts" 1 "it exited; its log follows"; cat "$DIR/agent.log"; kill $LOAD; exit 1
fi
sleep 3
M=$(curl -s localhost:$PORT/metrics)
val() { echo "$M" | grep -E "^$1" | head -1 | awk '{print $NF}'; }
echo "$M" | grep -E "^inferwatch_gpu_" | grep -v nvml_call > "$DIR/metrics-gpu.txt"
cat "$DIR/metrics-gpu.txt" | head -60
up=$(val 'inferwatch_gpu_collector_up')
check "collector up" "$(awk -v u="${up:-0}" 'BEGIN{exit !(u==1)}'; echo $?)" "inferwatch_gpu_collector_up=$up"
util=$(val 'inferwatch_gpu_utilization_ratio\{gpu="0"')
check "utilisation > 0.5 under load" "$(awk -v u="${util:-0}" 'BEGIN{exit !(u>0.5)}'; echo $?)" "util=$util"
power=$(val 'inferwatch_gpu_power_watts\{gpu="0"'); limit=$(val 'inferwatch_gpu_power_limit_watts\{gpu="0"')
check "0 < power <= limit" "$(awk -v p="${power:-0}" -v l="${limit:-0}" 'BEGIN{exit !(p>0 && p<=l)}'; echo $?)" "power=$power W, limit=$limit W"
mem=$(val "inferwatch_gpu_process_memory_bytes\\{gpu=\"0\",uuid=\"[^\"]*\",pid=\"$LOAD\"")
check "the load's pid with memory > 0" "$(awk -v m="${mem:-0}" 'BEGIN{exit !(m>0)}'; echo $?)" "pid $LOAD memory=$mem"

echo "== CPU over ${SECONDS_MEASURED}s of 1 s sampling (same window for all three)"
nvidia-smi dmon -s pucm -d 1 >/dev/null 2>&1 & DMON=$!
nvidia-smi --query-gpu=utilization.gpu,utilization.memory,memory.used,power.draw,temperature.gpu --format=csv -l 1 >/dev/null 2>&1 & QUERY=$!
sleep 2
ticks() { awk '{print $14+$15}' /proc/$1/stat; }
# The GPU collector's own threads (named "nvml"): the cost of NVML sampling alone. The comm
# field holds no spaces here, so the fields after it are where awk counts them.
nvml_ticks() { cat /proc/$1/task/*/stat 2>/dev/null | awk '$2=="(nvml)" {t+=$14+$15} END {print t+0}'; }
# children of nvidia-smi (none expected) are not counted; the agent's threads are.
a0=$(ticks $AGENT_PID); n0=$(nvml_ticks $AGENT_PID); d0=$(ticks $DMON); q0=$(ticks $QUERY); t0=$(date +%s.%N)
sleep "$SECONDS_MEASURED"
a1=$(ticks $AGENT_PID); n1=$(nvml_ticks $AGENT_PID); d1=$(ticks $DMON); q1=$(ticks $QUERY); t1=$(date +%s.%N)
HZ=$(getconf CLK_TCK)
pct() { awk -v a="$1" -v b="$2" -v t0="$t0" -v t1="$t1" -v hz="$HZ" 'BEGIN{printf "%.3f", 100*(b-a)/hz/(t1-t0)}'; }
agent_pct=$(pct $a0 $a1)
nvml_pct=$(pct $n0 $n1)
echo "inferwatch (whole agent, --gpu-interval 1s): ${agent_pct}% of one core"
echo "  of which its NVML threads:                 ${nvml_pct}% of one core"
echo "nvidia-smi dmon -s pucm -d 1:               $(pct $d0 $d1)% of one core"
echo "nvidia-smi --query-gpu=<5 fields> -l 1:     $(pct $q0 $q1)% of one core"
check "NVML sampling at 1 s <= 0.3% of one core" "$(awk -v p="$nvml_pct" 'BEGIN{exit !(p<=0.3)}'; echo $?)" "${nvml_pct}% (whole agent ${agent_pct}%)"
kill $DMON $QUERY 2>/dev/null

echo "== NVML calls (cumulative: calls, seconds, ms per call)"
curl -s localhost:$PORT/metrics | awk '
  /^inferwatch_gpu_nvml_calls_total/ {match($0,/call="[^"]*"/); c=substr($0,RSTART+6,RLENGTH-7); n[c]=$NF}
  /^inferwatch_gpu_nvml_call_seconds_total/ {match($0,/call="[^"]*"/); c=substr($0,RSTART+6,RLENGTH-7); s[c]=$NF}
  END {for (c in n) printf "%-32s %8d %10.4f %8.3f\n", c, n[c], s[c], (n[c]>0 ? 1000*s[c]/n[c] : 0)}' | sort -k3 -nr
kill -TERM $AGENT_PID; wait $AGENT_PID; check "agent exits 0 on SIGTERM" "$?" "log: $DIR/agent.log"
kill $LOAD 2>/dev/null; wait $LOAD 2>/dev/null
[ -n "${OUT:-}" ] && cp "$DIR/agent.log" "$DIR/metrics-gpu.txt" "$OUT/" 2>/dev/null
[ $fail = 0 ] && echo "gpu-check: all checks passed" || echo "gpu-check: FAILED"
exit $fail
