#!/usr/bin/env bash
# Runs every check of the repository from a clean clone and prints one closing line "N passed, N failed".
#   1. restore the local tools (Fantomas) and build the solution (Release);
#   2. run the F# and C# test projects (xunit, FsCheck.Xunit, and the Expecto tree bridged by one fact);
#   3. run each fsi script (the scripts are documentation that must keep working);
#   4. run the main job briefly (20 steps) as a smoke check;
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

check "main job (20 steps)" dotnet run -c Release --no-build --project samples/SwitchNorm.Demo -- 20
check "fantomas --check" dotnet fantomas --check src tests samples fsi-scripts bench

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
