#!/usr/bin/env bash
# Build Beam's Prism runner from the Go module proxy into build/prism/ (once), and print
# as the last line the flags to add to `seqcarry run`.
# Usage: engines/prism.sh [BEAM_VERSION]   (default: the Beam version installed in .venv)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$root/build/prism"
version="${1:-}"
if [ -z "$version" ]; then
    version="$("$root/.venv/bin/python" -c 'import apache_beam; print(apache_beam.__version__)')"
fi
bin="$dir/bin/prism"
go="$(command -v go || echo /usr/local/go/bin/go)"  # where this machine kind installs it
if [ -x "$bin" ] && [ "$(cat "$dir/VERSION" 2>/dev/null)" = "$version" ]; then
    echo "prism $version already built: $bin" >&2
else
    echo "building prism v$version with $("$go" version) into $dir (a few minutes the first time)" >&2
    mkdir -p "$dir/bin"
    GOBIN="$dir/bin" GOPATH="$dir/gopath" GOCACHE="$dir/gocache" GOMODCACHE="$dir/gopath/pkg/mod" \
        GOFLAGS=-modcacherw "$go" install "github.com/apache/beam/sdks/v2/go/cmd/prism@v$version"
    echo "$version" > "$dir/VERSION"
    rm -rf "$dir/gopath" "$dir/gocache"   # ~1.4 GB of module and build caches; the binary is all we need
fi
echo "--runner=PrismRunner --prism_location=$bin --environment_type=LOOPBACK"
