#!/usr/bin/env bash
# Consumer tests: pack the libraries as `dotnet pack` at the root does, into a local feed, then use them as a stranger
# would, with an empty NuGet folder (so nothing patched or restored earlier can hide a missing step) and no file of
# the repository imported:
#   csharp  a console project that converts a TorchVision resnet18, trains, saves and loads (tests/consumers/csharp)
#   fsharp  a dotnet fsi script with #r "nuget: SwitchNorm.FSharp" and #r "nuget: libtorch-cpu-linux-x64"
#   nobackend  a console project without a libtorch backend: the first SwitchNorm call says which package to add
# Usage: bash tests/consumers/run.sh [csharp] [fsharp] [nobackend]   (default: all); prints the package sizes.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
work="$(mktemp -d /tmp/switchnorm-consumers.XXXXXX)"
trap 'rm -rf "$work"' EXIT
which=("$@"); [ ${#which[@]} -eq 0 ] && which=(csharp fsharp nobackend)
# a version no cache can hold
suffix="consumer.$(date +%s)"
version="0.3.0-$suffix"
(cd "$repo" && dotnet pack -c Release -o "$work/feed" -p:VersionSuffix="$suffix" -nologo -clp:ErrorsOnly >"$work/pack.log" 2>&1) ||
    { tail -20 "$work/pack.log"; exit 1; }
echo "packages:"; (cd "$work/feed" && ls -l --block-size=K *.nupkg *.snupkg | awk '{print "  " $9 ": " $5}')
[ "$(ls "$work/feed"/*.nupkg | wc -l)" -eq 2 ] || { echo "expected exactly 2 packages"; exit 1; }
export NUGET_PACKAGES="$work/packages"
cat >"$work/nuget.config" <<XML
<?xml version="1.0" encoding="utf-8"?>
<configuration>
  <packageSources>
    <add key="switchnorm-local" value="$work/feed" />
  </packageSources>
</configuration>
XML
for w in "${which[@]}"; do
    case "$w" in
    csharp)
        mkdir "$work/csharp"
        cp "$repo/tests/consumers/csharp/Consumer.csproj" "$repo/tests/consumers/csharp/Program.cs" "$work/csharp/"
        cp "$work/nuget.config" "$work/csharp/"
        (cd "$work/csharp" && dotnet run -c Release -p:SwitchNormVersion="$version" -nologo) | tee "$work/csharp.log"
        grep -q "consumer ok" "$work/csharp.log"
        ;;
    fsharp)
        mkdir "$work/fsharp"
        sed -e "s|@FEED@|$work/feed|" -e "s|@VERSION@|$version|" "$repo/tests/consumers/fsharp/consumer.fsx" >"$work/fsharp/consumer.fsx"
        cp "$work/nuget.config" "$work/fsharp/"
        (cd "$work/fsharp" && dotnet fsi consumer.fsx) | tee "$work/fsharp.log"
        grep -q "script ok" "$work/fsharp.log"
        ;;
    nobackend)
        mkdir "$work/nobackend"
        grep -v -e "libtorch-cpu-linux-x64" -e "TorchVision" "$repo/tests/consumers/csharp/Consumer.csproj" >"$work/nobackend/Consumer.csproj"
        cp "$repo/tests/consumers/nobackend/Program.cs" "$work/nuget.config" "$work/nobackend/"
        # TorchSharp prints its whole native-loading trace; keep the one line this check is about
        (cd "$work/nobackend" && dotnet run -c Release -p:SwitchNormVersion="$version" -nologo) >"$work/nobackend.log" 2>&1 ||
            { tail -40 "$work/nobackend.log"; false; }
        grep "^clear message: " "$work/nobackend.log"
        ;;
    esac
done
