# Sourced by every device-run script (from the repository root, after `source .bundle/install.sh`).
# Sets PDSERVE_COMMIT (for the result files' headers: the GPU host's copy has no .git), TRACE (the Mooncake
# trace, carried in .gpucalls/ because ../shared is absent there) and RUN_DIR (what comes back: packed
# into one tgz at the end by `pack_results`, since only a few files return per call).
set -u
export PDSERVE_COMMIT=${PDSERVE_COMMIT:-$(cat .gpucalls/commit 2>/dev/null || git rev-parse --short HEAD)}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
TRACE=${TRACE:-.gpucalls/mooncake_conversation.jsonl}
OUT=${OUT:-/tmp/out}
RUN_DIR=$OUT/r
mkdir -p "$RUN_DIR"
_since=$(mktemp)  # result files written after this are the run's
pack_results() {
  find benchmarks/results -type f -newer "$_since" -exec cp {} "$RUN_DIR"/ \;
  tar czf "$OUT/r.tgz" -C "$OUT" r && rm -rf "$RUN_DIR"
}
trap pack_results EXIT
