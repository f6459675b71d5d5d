#!/usr/bin/env bash
# Runs every check of the repository from a clean clone and prints one closing line "N passed, N failed".
#   1. restore the local tools (Fantomas) and build the solution (Release);
#   2. run the F# and C# test projects (xunit, FsCheck.Xunit, and the Expecto tree bridged by one fact);
#   3. run each fsi script (the scripts are documentation that must keep working);
#   4. run the main job briefly (30 steps per run, every normalizer) and check its files, and that a bad option
#      or a corrupt data file ends with a message and exit code 2;
#   5. check the F# formatting with Fantomas.
# Exits non-zero when anything failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1 TERM=dumb
results="$(mktemp -d)"
passed=0
failed=0
check() { # name, command...
    local name="$1"; shift
    echo "== $name"
    if "$@"; then passed=$((passed + 1)); echo "   ok: $name"; else failed=$((failed + 1)); echo "   FAILED: $name"; fi
}

dotnet tool restore >/dev/null || { echo "dotnet tool restore failed"; echo "0 passed, 1 failed"; exit 1; }
if ! dotnet build SwitchNorm.sln -c Release -nologo -clp:ErrorsOnly; then
    echo "build failed"
    echo "0 passed, 1 failed"
    exit 1
fi

for proj in tests/SwitchNorm.Tests/SwitchNorm.Tests.fsproj tests/SwitchNorm.CSharp.Tests/SwitchNorm.CSharp.Tests.csproj; do
    name="$(basename "$proj" | sed 's/\.[cf]sproj$//')"
    echo "== $name"
    dotnet test "$proj" -c Release --no-build --nologo --logger "trx;LogFileName=$name.trx" --results-directory "$results" \
        || echo "   (dotnet test reported failures in $name)"
    trx="$results/$name.trx"
    if [ -f "$trx" ]; then
        counters="$(grep -o '<Counters [^>]*>' "$trx")"
        p="$(sed -n 's/.* passed="\([0-9]*\)".*/\1/p' <<<"$counters")"
        f="$(sed -n 's/.* failed="\([0-9]*\)".*/\1/p' <<<"$counters")"
        passed=$((passed + ${p:-0}))
        failed=$((failed + ${f:-0}))
        echo "   $name: ${p:-0} passed, ${f:-0} failed"
    else
        echo "   no results for $name"
        failed=$((failed + 1))
    fi
done

for script in fsi-scripts/*.fsx; do
    [ "$(basename "$script")" = "references.fsx" ] && continue
    check "fsi $script" dotnet fsi "$script"
done

job=samples/SwitchNorm.Experiment/bin/Release/net10.0/switchnorm-fashion.dll
main_job_smoke() {
    local out
    out="$(mktemp -d)"
    dotnet "$job" --max-steps 30 -n bn gn sn ssn -b 2 8 --recalibration-images 64 -o "$out" || return 1
    for f in results.json results.csv mixtures.csv accuracy.md accuracy.png mixture-sn-b2.png mixture-ssn-b8.png; do
        [ -s "$out/$f" ] || { echo "missing $out/$f"; return 1; }
    done
    [ "$(wc -l <"$out/results.csv")" -eq 9 ] || { echo "results.csv should have a header and 8 runs"; return 1; }
}
refuses() { # expected message, then arguments: the job must exit with 2 and print the message
    local expected="$1"; shift
    local text code
    text="$(dotnet "$job" "$@" 2>&1)"; code=$?
    [ "$code" -eq 2 ] && grep -qF "$expected" <<<"$text" || { echo "exit $code, output: $text"; return 1; }
}
corrupt="$(mktemp -d)"
cp samples/SwitchNorm.Experiment/data/*.gz "$corrupt"/
head -c 100000 samples/SwitchNorm.Experiment/data/train-images-idx3-ubyte.gz >"$corrupt/train-images-idx3-ubyte.gz"
check "main job (30 steps per run)" main_job_smoke
check "main job refuses a bad option" refuses "unknown normalizer 'xx'" -n bn xx
check "main job refuses a missing data folder" refuses "does not exist" --data-dir /nonexistent/fashion
check "main job refuses a truncated data file" refuses "train-images-idx3-ubyte.gz: 181452 bytes for 6000 items" --data-dir "$corrupt"
check "fantomas --check" dotnet fantomas --check src tests samples fsi-scripts bench

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
