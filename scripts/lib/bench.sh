# Helpers shared by scripts/bench and scripts/bench-concurrency (sourced, not run).
# They expect $root (the repository) and a say() function for progress lines.

# The demo model file of a short name.
model_path() {
  case "$1" in
    smollm2) echo "$root/models/SmolLM2-135M-Instruct.Q4_1.gguf" ;;
    gemma3) echo "$root/models/gemma-3-270m-q4_k_m.gguf" ;;
    *) echo "unknown model $1 (known: smollm2 gemma3)" >&2; exit 2 ;;
  esac
}

# A TCP port free on 127.0.0.1 right now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# llama.cpp built with GGML_NATIVE on a CPU that advertises AMX can die with SIGILL on the AMX
# tile instructions (seen in VMs that do not enable AMX state). Its AMX path is an "extra buffer
# type" that weight repacking turns on; when a quick llama-bench run dies with SIGILL, run
# llama.cpp with repacking off (--repack 0 / --no-repack) and say so in the report.
# Usage: llama_cpp_probe LLAMA_BIN_DIR PROBE_MODEL NOTE_FILE
# Sets the arrays lb_extra (llama-bench flags) and ls_extra (llama-server flags); writes NOTE_FILE
# when repacking is off, removes it otherwise.
llama_cpp_probe() {
  local bin="$1" probe_model="$2" note="$3" rc
  lb_extra=()
  ls_extra=()
  set +e
  "$bin/llama-bench" -m "$probe_model" -p 8 -n 0 -r 1 >/dev/null 2>&1
  rc=$?
  set -e
  if [ "$rc" = 132 ]; then
    say "llama-bench dies with SIGILL (AMX); running llama.cpp with --repack 0 / --no-repack"
    lb_extra=(--repack 0)
    ls_extra=(--no-repack)
    echo "llama.cpp AMX SIGILL: run with --repack 0 (llama-bench) / --no-repack (llama-server)" >"$note"
  else
    rm -f "$note"
  fi
}
