# shellcheck shell=bash
# Builds commands of Go modules from the module proxy at pinned versions, for .ci/kube-setup and
# .ci/node-setup. Each module gets a throw-away main module that only requires it, so its
# dependencies resolve exactly as its own go.mod says (MVS); nothing is checked out and no
# upstream build script runs. Source it, then call gobuild_init.
#
# Environment: SANDLET_GOCACHE, when set, is the Go build cache to use and keep (a caller that
# builds several modules in a row shares one cache and deletes it itself); otherwise a temporary
# cache is used and deleted at exit, with the rest of the work directory.

GOBUILD_NICE=(nice -n 10)

# Creates $GOBUILD_WORK (deleted at exit) and exports the build environment.
gobuild_init() {
  command -v go >/dev/null || { log "go is not installed (need go 1.26+)"; exit 1; }
  GOBUILD_WORK="$(mktemp -d "${TMPDIR:-/tmp}/sandlet-gobuild.XXXXXX")"
  # shellcheck disable=SC2064 # expand now: the trap must remove this directory
  trap "rm -rf '$GOBUILD_WORK'" EXIT
  export GOCACHE="${SANDLET_GOCACHE:-$GOBUILD_WORK/gocache}"
  # Static binaries by default; a build that needs cgo (runc) says so.
  export CGO_ENABLED=0
  # Builds resolve modules through the proxy (module mode, go.mod may be updated).
  export GOFLAGS=-mod=mod
}

# Path of the go.mod of a module version, downloaded into the module cache.
gomod_of() {
  (cd "$GOBUILD_WORK" && go mod download -json "$1") |
    sed -n 's/^[[:space:]]*"GoMod":[[:space:]]*"\(.*\)",\{0,1\}$/\1/p'
}

# A main module in $GOBUILD_WORK/$1 that requires module $2 at version $3; prints its directory.
module_dir() {
  local dir="$GOBUILD_WORK/$1" upstream go_line
  mkdir -p "$dir"
  upstream="$(gomod_of "$2@$3")"
  [[ -f "$upstream" ]] || { log "no go.mod for $2@$3"; exit 1; }
  go_line="$(awk '$1 == "go" { print $2; exit }' "$upstream")"
  printf 'module sandlet.local/%s-build\n\ngo %s\n\nrequire %s %s\n' "$1" "$go_line" "$2" "$3" >"$dir/go.mod"
  echo "$dir"
}

# The main module for commands of k8s.io/kubernetes at version $1; prints its directory.
# k8s.io/kubernetes replaces its staging modules (k8s.io/api, ...) with ./staging/...; outside
# that repository they must be pinned to the matching v0.X.Y tags instead.
k8s_module_dir() {
  local version="$1" dir upstream
  dir="$(module_dir "kubernetes-$version" k8s.io/kubernetes "$version")"
  upstream="$(gomod_of "k8s.io/kubernetes@$version")"
  {
    printf '\nreplace (\n'
    # Staged modules that upstream also requires (the others need no pin).
    awk -v ver="v0.${version#v1.}" '
      /^require[[:space:]]*\(/ { inreq = 1; next }
      /^replace[[:space:]]*\(/ { inrep = 1; next }
      /^\)/ { inreq = 0; inrep = 0; next }
      inreq { required[$1] = 1 }
      /^require[[:space:]]+[^(]/ { required[$2] = 1 }
      inrep && $2 == "=>" && $3 ~ /^\.\/staging\// { staged[++n] = $1 }
      /^replace[[:space:]]+[^(]/ && $3 == "=>" && $4 ~ /^\.\/staging\// { staged[++n] = $2 }
      END { for (i = 1; i <= n; i++) if (staged[i] in required) printf "\t%s => %s %s\n", staged[i], staged[i], ver }
    ' "$upstream"
    printf ')\n'
  } >>"$dir/go.mod"
  echo "$dir"
}

# The -ldflags that make Kubernetes $1 commands report their version (`--version`, /version).
k8s_ldflags() {
  local version="$1" minor pkg ldflags="-s -w"
  minor="${version#v1.}"
  minor="${minor%%.*}"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$ldflags"
}

# go_build DIR OUT PACKAGE@VERSION [go build flags...]: builds PACKAGE of the module DIR
# requires (VERSION is that module's) into the file OUT, replaced only once the build succeeded.
go_build() {
  local dir="$1" out="$2" pkg="${3%@*}"
  log "downloading modules for $3"
  (cd "$dir" && "${GOBUILD_NICE[@]}" go get "$3")
  shift 3
  log "compiling $pkg"
  mkdir -p "$(dirname "$out")"
  (cd "$dir" && "${GOBUILD_NICE[@]}" go build -trimpath "$@" -o "$out.tmp" "$pkg")
  mv -f "$out.tmp" "$out"
}
