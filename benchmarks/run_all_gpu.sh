#!/usr/bin/env bash
# Every GPU check and benchmark in one call, each under its own time limit, logs under $OUT.
# On the lent H100:  PYTHONPATH=$PWD bash benchmarks/run_all_gpu.sh   (about 15 minutes)
# Pass SKIP="attention deepembed ..." to leave parts out.
set -u
OUT=${OUT:-./bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
run() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  case " ${SKIP:-} " in *" $name "*) echo "== $name: skipped"; return;; esac
  echo "== $name"
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$?"; grep -v -i warn "$OUT/$name.log" | tail -30
}
# fla-core and einops for the attention peers: pip install --no-index --find-links .whl fla-core
run cuda_tests 240 env TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider -k cuda \
  tests/test_deepembed_pass.py tests/test_deepembed_kernels.py tests/test_prefetch.py \
  tests/test_attention_kernels.py tests/test_cuda_sbl.py
run sbl 240 python3 benchmarks/bench_sbl.py --out "$OUT"
run sbl_profile 90 python3 benchmarks/profile_sbl_compiled.py --out "$OUT"
run sbl_overhead 60 python3 benchmarks/cpu_overhead_sbl.py
run example 100 python3 examples/tiny_onn_sbl.py
run attention 300 python3 benchmarks/bench_attention.py --budget 200
run deepembed 200 python3 benchmarks/bench_deepembed.py
run prefetch_overhead 90 python3 benchmarks/host_overhead_prefetch.py
