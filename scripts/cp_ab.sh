#!/usr/bin/env bash
# A/B of `bench cp` variants between a base checkout of the package (copied into .ab/,
# ignored by git and carried to the GPU machine) and the working tree, alternating
# base/new twice in one session so that drift hits both. Usage:
#   scripts/cp_ab.sh "VARIANT" ["VARIANT" ...]
# Logs go to $OUT/ab-{base,new}{1,2}.log; the matching lines are printed last.
set -u
OUT=${OUT:-/tmp/ringflash_out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
for i in 1 2; do
  (cd .ab && timeout "${AB_LIMIT:-120}" python3 -m ringflash bench cp --variants "$@" > "$OUT/ab-base$i.log" 2>&1)
  timeout "${AB_LIMIT:-120}" python3 -m ringflash bench cp --variants "$@" > "$OUT/ab-new$i.log" 2>&1
done
for f in base1 new1 base2 new2; do echo "== $f"; grep -E "^  (mixed|single) " "$OUT/ab-$f.log" || tail -5 "$OUT/ab-$f.log"; done
