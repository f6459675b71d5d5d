#!/usr/bin/env bash
# Builds the documentation site (fsdocs: the guides in docs/ and the API reference from the XML docs) into DIR, then
# checks it: fsdocs --strict (no warnings), every relative link and image resolves, and headless Chromium renders the
# index page and an API page to PNG screenshots in DIR/screenshots (skipped, loudly, where chromium is missing).
#   bash docs/build-site.sh DIR        (after `dotnet build -c Release SwitchNorm.sln`)
set -euo pipefail
cd "$(dirname "$0")/.."
site="$(realpath -m "${1:-/tmp/switchnorm-site}")"
rm -rf "$site" .fsdocs
dotnet tool restore >/dev/null
dotnet fsdocs build --strict --clean \
    --projects src/SwitchNorm.FSharp/SwitchNorm.FSharp.fsproj src/SwitchNorm.CSharp/SwitchNorm.CSharp.csproj \
    --input docs --output "$site" --properties Configuration=Release \
    --parameters root "file://$site/" fsdocs-collection-name SwitchNorm >"$site.log" 2>&1 ||
    { tail -30 "$site.log"; echo "fsdocs build failed (log: $site.log)"; exit 1; }
[ -f "$site/index.html" ] && [ -f "$site/reference/index.html" ] || { echo "no index or API reference in $site"; exit 1; }
pages=$(find "$site" -name '*.html' | wc -l)
api=$(find "$site/reference" -name '*.html' | wc -l)

# every href/src that is neither external nor an anchor must name an existing file
broken=0
while IFS= read -r page; do
    dir="$(dirname "$page")"
    while IFS= read -r link; do
        target="${link%%#*}"
        target="${target%%\?*}"
        [ -z "$target" ] && continue
        case "$target" in
            http://* | https://* | mailto:* | javascript:* | data:*) continue ;;
            "file://$site/"*) path="$site/${target#"file://$site/"}" ;;
            /*) path="$target" ;;
            *) path="$dir/$target" ;;
        esac
        [ -e "$path" ] || { echo "broken link in ${page#"$site/"}: $link"; broken=$((broken + 1)); }
    done < <(grep -o -E '(href|src)="[^"]*"' "$page" | sed -E 's/^(href|src)="//; s/"$//' | sort -u)
done < <(find "$site" -name '*.html')
[ "$broken" -eq 0 ] || { echo "$broken broken link(s)"; exit 1; }
echo "site: $pages pages ($api API pages) in $site, no broken links"

if command -v chromium >/dev/null; then
    mkdir -p "$site/screenshots"
    for page in index.html reference/switchnorm-fsharp-pytorch.html; do
        png="$site/screenshots/$(basename "$page" .html).png"
        timeout 120 chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,1000 \
            --screenshot="$png" "file://$site/$page" >/dev/null 2>&1 || true
        [ "$(stat -c %s "$png" 2>/dev/null || echo 0)" -gt 20000 ] || { echo "chromium did not render $page"; exit 1; }
        echo "rendered $page -> $png"
    done
else
    echo "!!!!!!!! chromium is missing: the site's pages were NOT rendered (apt-get install chromium to check them)"
fi
