#!/usr/bin/env bash
# Builds tests/gohost, a Go program that loads a SPIRE UpstreamAuthority plugin through
# hashicorp/go-plugin's client, and prints the path of the binary on stdout. The build is offline:
# it generates the SPIRE protobuf packages with protoc, protoc-gen-go and protoc-gen-go-grpc, and
# compiles in GOPATH mode against Debian's Go sources in /usr/share/gocode (scripts/install-prereqs.sh
# installs them). The binary is cached under $SIGIL_CACHE_DIR/gohost (default ~/.cache/sigil/gohost)
# and rebuilt only when the Go sources, the .proto files, this script, the Go toolchain or the
# Debian Go packages change.
# Usage: scripts/go-host-check.sh
set -euo pipefail

repo_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache_dir="${SIGIL_CACHE_DIR:-$HOME/.cache/sigil}/gohost"
binary="$cache_dir/bin/gohost"
debian_gopath=/usr/share/gocode

# Go import path of each SPIRE .proto file, relative to proto/. The generated packages live in
# the build GOPATH next to the host's own sources.
declare -A go_packages=(
    [spire/plugin/types/x509certificate.proto]="gohost/pb/spire/plugin/types;typespb"
    [spire/plugin/types/jwtkey.proto]="gohost/pb/spire/plugin/types;typespb"
    [spire/plugin/server/upstreamauthority/v1/upstreamauthority.proto]="gohost/pb/spire/plugin/server/upstreamauthority/v1;upstreamauthorityv1"
    [spire/service/common/config/v1/config.proto]="gohost/pb/spire/service/common/config/v1;configv1"
    [spire/service/private/init/v1/init.proto]="gohost/pb/spire/service/private/init/v1;initv1"
)

missing=()
for tool in go protoc protoc-gen-go protoc-gen-go-grpc flock sha256sum; do
    command -v "$tool" >/dev/null || missing+=("command $tool")
done
for package_dir in github.com/hashicorp/go-plugin google.golang.org/grpc google.golang.org/protobuf github.com/golang/protobuf; do
    [[ -d "$debian_gopath/src/$package_dir" ]] || missing+=("Go sources $debian_gopath/src/$package_dir")
done
if ((${#missing[@]})); then
    echo "go-host-check: missing ${missing[*]}. Run scripts/install-prereqs.sh to install them." >&2
    exit 1
fi

proto_files=("${!go_packages[@]}")
mkdir -p "$cache_dir"
exec 9>"$cache_dir/build.lock"
flock 9

stamp=$(
    cd "$repo_dir"
    {
        sha256sum tests/gohost/*.go scripts/go-host-check.sh
        (cd proto && sha256sum "${proto_files[@]}")
        go version
        protoc --version
        protoc-gen-go --version
        protoc-gen-go-grpc --version
        dpkg-query -W golang-github-hashicorp-go-plugin-dev golang-google-grpc-dev golang-google-protobuf-dev \
            golang-github-golang-protobuf-1-5-dev 2>/dev/null || true
    } | sha256sum | cut -d' ' -f1
)
if [[ -x "$binary" && -f "$cache_dir/stamp" && $(cat "$cache_dir/stamp") == "$stamp" ]]; then
    echo "$binary"
    exit 0
fi

echo "go-host-check: building $binary" >&2
gopath="$cache_dir/gopath"
source_dir="$gopath/src/gohost"
rm -rf "$gopath"
mkdir -p "$source_dir" "$cache_dir/bin"
cp "$repo_dir"/tests/gohost/*.go "$source_dir/"

mappings=()
for proto in "${proto_files[@]}"; do
    mappings+=("--go_opt=M$proto=${go_packages[$proto]}" "--go-grpc_opt=M$proto=${go_packages[$proto]}")
done
protoc -I "$repo_dir/proto" \
    --go_out="$gopath/src" --go-grpc_out="$gopath/src" "${mappings[@]}" \
    "${proto_files[@]/#/$repo_dir/proto/}"

# GOPATH mode with the network closed: every import resolves from the build GOPATH or Debian's.
export GO111MODULE=off GOPROXY=off GOFLAGS= GOPATH="$gopath:$debian_gopath"
(cd "$source_dir" && go vet . && go build -o "$binary.partial" .)
mv "$binary.partial" "$binary"
echo "$stamp" >"$cache_dir/stamp"
echo "$binary"
