#!/usr/bin/env bash
# Interleaved A/B of `extract --pack` wall time: an older commit against this checkout, on the same dataset.
#   benchmarks/extract_ab.sh OLD_REV DATASET [ROUNDS]
# OLD_REV is checked out in a temporary worktree and run with its own import names (before 0ee0356 the
# CLI module was `pipeline`, after it `softclip`). Prints one JSON line per run, then the medians.
set -euo pipefail
old_rev=$1 dataset=$2 rounds=${3:-2}
repo=$(cd "$(dirname "$0")/.." && pwd)
python=$repo/.venv/bin/python
weights=$repo/extract/weights/shapes
work=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$work/old" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$repo" worktree add -q --detach "$work/old" "$old_rev"
module=softclip; [ -f "$work/old/pipeline/__main__.py" ] && module=pipeline
run() {  # name, code folder, module
  local start out=$work/out-$1
  rm -rf "$out"; start=$(date +%s.%N)
  (cd "$2" && PYTHONPATH=$([ "$3" = pipeline ] && echo "$2") "$python" -m "$3" extract --dataset "$dataset" \
     --weights "$weights/model.pth" --labelmap "$weights/labelmap.json" \
     --config "$2/extract/configs/extract-shapes.yaml" --out "$out" --pack >"$work/$1.log" 2>&1)
  printf '{"run": "%s", "wall_s": %.1f, "packed_bytes": %s}\n' "$1" "$(echo "$(date +%s.%N) - $start" | bc)" \
    "$(du -sb "$out/packed" | cut -f1)"
}
for i in $(seq "$rounds"); do run old "$work/old" "$module"; run new "$repo" softclip; done | tee "$work/runs.jsonl"
"$python" - "$work/runs.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
median = {n: statistics.median(r["wall_s"] for r in runs if r["run"] == n) for n in ("old", "new")}
print(json.dumps({"median_wall_s": median, "wall_ratio_new_over_old": round(median["new"] / median["old"], 3)}))
PY
