#!/usr/bin/env bash
# Proof that the test suite bites: applies each deliberate fault of mutants.py to a fresh copy of the repository,
# one at a time, builds it, runs the F# test project, and prints which tests failed. A mutant that no test
# catches is reported as SURVIVED and makes the script exit non-zero. Takes about a minute per mutant on 2 cores.
# Usage: bash tests/mutants/run.sh [mutant ...]      (default: all, plus the unmutated baseline first)
set -uo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
work="$(mktemp -d /tmp/switchnorm-mutants.XXXXXX)"
trap 'rm -rf "$work"' EXIT
if [ $# -gt 0 ]; then mutants=("$@"); else mutants=(baseline $(python3 "$repo/tests/mutants/mutants.py" list)); fi
survivors=0
printf '| mutant | failed tests | caught by |\n|---|---|---|\n'
for m in "${mutants[@]}"; do
  dir="$work/$m"
  mkdir -p "$dir"
  (cd "$repo" && git ls-files -z | xargs -0 -I{} cp --parents {} "$dir")
  if [ "$m" != baseline ]; then python3 "$repo/tests/mutants/mutants.py" apply "$m" "$dir" || exit 2; fi
  if ! dotnet build "$dir/tests/SwitchNorm.Tests" -c Release > "$dir/build.log" 2>&1; then
    printf '| %s | build failed | (see %s) |\n' "$m" "$dir/build.log"; survivors=$((survivors+1)); continue
  fi
  dotnet test "$dir/tests/SwitchNorm.Tests" -c Release --no-build --logger "trx;LogFileName=r.trx" --results-directory "$dir/tr" > "$dir/test.log" 2>&1
  summary=$(python3 - "$dir/tr/r.trx" <<'PY'
import sys, xml.etree.ElementTree as ET
ns = {"t": "http://microsoft.com/schemas/VisualStudio/TeamTest/2010"}
root = ET.parse(sys.argv[1]).getroot()
import re
def short(name):
    name = re.sub(r"\((\w+: .*)\)$", "", name)   # drop theory arguments "(n: 1, c: 2.5)", which may contain dots
    prefix = re.match(r"^[\w+]+\.", name)          # drop the module/class prefix "Properties+XunitRunner."
    return name[prefix.end():] if prefix else name
failed = sorted({short(r.get("testName")) for r in root.iterfind(".//t:UnitTestResult", ns)
                 if r.get("outcome") == "Failed" and "Expecto tree" not in r.get("testName")})
print(f"{len(failed)}\t" + "; ".join(failed))
PY
)
  n="${summary%%$'\t'*}"; names="${summary#*$'\t'}"
  if [ "$m" = baseline ]; then
    printf '| (none: baseline) | %s | %s |\n' "$n" "${names:-all pass}"
  elif [ "$n" = 0 ]; then
    printf '| %s | 0 | SURVIVED |\n' "$m"; survivors=$((survivors+1))
  else
    printf '| %s | %s | %s |\n' "$m" "$n" "$names"
  fi
done
exit $((survivors > 0))
