#!/usr/bin/env bash
# The GPU numbers of the performance issue in one run: model-FLOPs utilisation
# of configs/text8.py and configs/owt.py in bf16, and the effect of the
# attention and precision switches. One JSON file and one log per variant go
# to OUT_DIR, and a table is printed last.
#
#   benchmarks/gpu_suite.sh OUT_DIR [PEAK_TFLOPS [VARIANT...]]
#
# PEAK_TFLOPS is the datasheet dense bf16 peak used for MFU (989: H100 SXM).
# VARIANTs pick a subset by name (text8_bf16, owt_bf16, ...); all by default.
set -u
out_dir=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR [PEAK_TFLOPS [VARIANT...]]}
peak_tflops=${2:-989}
variants=("${@:3}")
mkdir -p "$out_dir"
export PYTHONUNBUFFERED=1

bench() {
  local name=$1
  shift
  if ((${#variants[@]})) && [[ " ${variants[*]} " != *" $name "* && $name != smoke ]]; then
    return 0
  fi
  echo "== $name: $*"
  timeout 170 python3 benchmarks/train_step.py --peak_tflops="$peak_tflops" "$@" \
    >"$out_dir/$name.json" 2>"$out_dir/$name.log" || {
    echo "   failed (exit $?): last lines of $out_dir/$name.log"
    tail -n 5 "$out_dir/$name.log"
  }
}

text8=(--config=configs/text8.py --steps=10)
owt=(--config=configs/owt.py --vocab_size=50257 --config.batch_size=32 --steps=10)
owt_prime=(--config=configs/owt_prime.py --vocab_size=50257 --config.batch_size=32 --steps=10)

# A two-layer step first, so that a broken environment stops the suite early.
bench smoke "${text8[@]}" --config.model.width=128 --config.model.num_layers=2 \
  --config.model.num_heads=4 --config.batch_size=8 --steps=2 || exit 1
[[ -s "$out_dir/smoke.json" ]] || exit 1
bench text8_bf16 "${text8[@]}" --profile_dir="$out_dir/profile_text8_bf16"
bench owt_bf16 "${owt[@]}" --profile_dir="$out_dir/profile_owt_bf16"
bench owt_bf16_batch64 "${owt[@]}" --config.batch_size=64
bench text8_f32 "${text8[@]}" --config.model.dtype=float32
bench owt_prime_bf16 "${owt_prime[@]}"
bench text8_bf16_xla_attention "${text8[@]}" --config.model.attention_impl=xla
bench owt_bf16_xla_attention "${owt[@]}" --config.model.attention_impl=xla

python3 - "$out_dir" <<'PY'
import json, pathlib, sys
print(f"{'variant':28s} {'s/step':>8s} {'tokens/s':>10s} {'MFU':>6s} {'MFU*':>6s} "
      f"{'peak TF/s':>9s} {'GiB':>6s}")
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
  text = path.read_text().strip().splitlines()
  if not text:
    print(f"{path.stem:28s} failed")
    continue
  r = json.loads(text[-1])
  print(f"{path.stem:28s} {r['seconds_per_step']:8.4f} {r['tokens_per_sec']:10.0f} "
        f"{r['mfu'] or 0:6.3f} {r['mfu_of_measured_peak']:6.3f} "
        f"{r['matmul_peak_flops_compute_dtype'] / 1e12:9.1f} "
        f"{(r['peak_memory_bytes'] or 0) / 2**30:6.1f}")
print("MFU: of the datasheet peak; MFU*: of the matmul peak measured in the same run")
PY
