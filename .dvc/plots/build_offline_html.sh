#!/usr/bin/env bash
# Rebuilds .dvc/plots/offline.html, the page template of `dvc plots show` / `dvc plots diff` (set as
# plots.html_template in .dvc/config). DVC's default page loads Vega, Vega-Lite and Vega-Embed from a CDN, so
# with no network the data-series plots stay blank; this template carries the three libraries inline, so
# the page DVC writes renders every plot offline. The libraries come from the npm registry at pinned
# versions (each BSD-3-Clause, by the Vega project); bump a version here and rerun to update them.
# Needs npm; run from anywhere: bash .dvc/plots/build_offline_html.sh
set -euo pipefail
PACKAGES=(vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0)
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "${PACKAGES[@]}" >/dev/null)
{
  cat <<'HEAD'
<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
HEAD
  for pkg in "${PACKAGES[@]}"; do
    name="${pkg%@*}"
    mkdir -p "$work/$name" && tar -xzf "$work/$name-${pkg##*@}.tgz" -C "$work/$name"
    js="$work/$name/package/build/$name.min.js"
    if grep -q -e '</script' -e '<!--' -e '{plot_divs}' -e '{scripts}' -e '{refresh_tag}' "$js"; then
      echo "$pkg: $js holds text that cannot be inlined in the template" >&2
      exit 1
    fi
    printf '    <!-- %s, BSD-3-Clause, Copyright (c) the Vega project (https://vega.github.io) -->\n    <script>\n' "$pkg"
    cat "$js"
    printf '\n    </script>\n'
  done
  cat <<'TAIL'
</head>
<body>
    {plot_divs}
</body>
</html>
TAIL
} > "$here/offline.html.tmp"
mv "$here/offline.html.tmp" "$here/offline.html"
echo "wrote $here/offline.html ($(wc -c < "$here/offline.html") bytes)"
