#!/bin/sh
# A stand-in for the Dockerfile's base image, for a machine that reaches Debian's and Python's
# package registries but no image registry: Debian bookworm (debootstrap minbase) with its
# python3 (3.11), python3-venv, python3-pip and ca-certificates, imported into the local Docker
# engine under the name on the Dockerfile's FROM line, so that `docker build` finds it there
# instead of pulling it.
#
#   deploy/docker/base-image.sh              # as root, once; then, from the repository root:
#   docker build --network host -t streamcast .
#
# The stand-in trusts what this machine trusts: the machine's CA bundle replaces the image's, and
# pip in the image reads it (/etc/pip.conf), with this machine's package index and proxy when
# those are web addresses. Builds FROM the stand-in carry that pip.conf: it is for local builds.
#
# An image of that name that this script did not make (the real one, pulled) is left alone; one
# it made is rebuilt only when its recipe changes (this script, the CA bundle, the pip settings),
# so a second run takes a second. DEBIAN_MIRROR overrides the mirror read from apt's sources.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
label=org.streamcast.stand-in

base=$(awk 'toupper($1) == "FROM" { print $2; exit }' "$repo/Dockerfile")
[ -n "$base" ] || { echo "base-image.sh: no FROM line in $repo/Dockerfile" >&2; exit 1; }
docker=${DOCKER:-docker}

# The CA bundle this machine's pip and apt use.
bundle=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
[ -f "$bundle" ] || { echo "base-image.sh: no CA bundle at $bundle" >&2; exit 1; }

# pip settings to carry: the web addresses among this machine's index and proxy settings (a
# file:// index or a local folder of wheels does not exist inside the image).
pip_setting() {  # NAME ENV_VALUE: the environment's value, else pip's configured one
    if [ -n "$2" ]; then
        printf '%s\n' "$2"
    elif command -v python3 >/dev/null 2>&1; then
        python3 -m pip config list 2>/dev/null \
            | sed -n "s/^[a-z]*\.$1='\(.*\)'\$/\1/p" | head -n 1
    fi
}
web_only() { tr ' ' '\n' | grep -E '^https?://' | tr '\n' ' ' | sed 's/ $//'; }
index_url=$(pip_setting index-url "${PIP_INDEX_URL:-}" | web_only)
extra_index_url=$(pip_setting extra-index-url "${PIP_EXTRA_INDEX_URL:-}" | web_only)
proxy=$(pip_setting proxy "${PIP_PROXY:-${HTTPS_PROXY:-${https_proxy:-}}}" | web_only)
pip_conf=$(
    echo "[global]"
    echo "cert = /etc/ssl/certs/ca-certificates.crt"
    [ -z "$index_url" ] || echo "index-url = $index_url"
    [ -z "$extra_index_url" ] || echo "extra-index-url = $extra_index_url"
    [ -z "$proxy" ] || echo "proxy = $proxy"
    [ -z "${PIP_DEFAULT_TIMEOUT:-}" ] || echo "timeout = $PIP_DEFAULT_TIMEOUT"
)

recipe=$({ cat "$0" "$bundle"; printf '%s\n' "$pip_conf"; } | sha256sum | cut -c1-16)

if "$docker" image inspect "$base" >/dev/null 2>&1; then
    made=$("$docker" image inspect -f "{{ index .Config.Labels \"$label\" }}" "$base")
    case "$made" in
        "" | "<no value>")
            echo "base-image.sh: $base is present and not a stand-in: left as it is"
            exit 0 ;;
        "$recipe")
            echo "base-image.sh: the stand-in $base is up to date"
            exit 0 ;;
    esac
fi

[ "$(id -u)" = 0 ] || { echo "base-image.sh: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || {
    echo "base-image.sh: debootstrap is not installed (apt-get install -y debootstrap)" >&2
    exit 1
}

mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list.d/debian.sources ]; then
    mirror=$(awk '$1 == "URIs:" { print $2; exit }' /etc/apt/sources.list.d/debian.sources)
fi
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1 == "deb" && $3 ~ /^bookworm$/ { print $2; exit }' /etc/apt/sources.list)
fi

rootfs=$(mktemp -d /var/tmp/streamcast-base.XXXXXX)
cleanup() {
    # a debootstrap that failed midway can leave its mounts behind: never delete through them
    for mount in proc sys dev/pts dev; do umount "$rootfs/$mount" 2>/dev/null || true; done
    rm -rf --one-file-system "$rootfs"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

echo "base-image.sh: debootstrap bookworm into $rootfs (${mirror:-debootstrap's default mirror})"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,passwd \
    bookworm "$rootfs" ${mirror:+"$mirror"} >"$rootfs.log" 2>&1 || {
    tail -n 30 "$rootfs.log" >&2
    echo "base-image.sh: debootstrap failed (log: $rootfs.log)" >&2
    exit 1
}
rm -f "$rootfs.log"

# Trust what the machine trusts; its own added certificates survive an update-ca-certificates run
# inside the image.
cp "$bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
if [ -d /usr/local/share/ca-certificates ]; then
    cp -R /usr/local/share/ca-certificates/. "$rootfs/usr/local/share/ca-certificates/"
fi
printf '%s\n' "$pip_conf" >"$rootfs/etc/pip.conf"

# As the official slim images: no package lists or caches; the engine supplies the rest.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/usr/share/man/* \
    "$rootfs"/usr/share/info/* "$rootfs/etc/resolv.conf" "$rootfs/etc/hostname"

tar -C "$rootfs" --numeric-owner -c . | "$docker" import \
    --change "LABEL $label=$recipe" \
    --change "ENV LANG=C.UTF-8" \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change 'CMD ["python3"]' \
    - "$base" >/dev/null
echo "base-image.sh: imported the stand-in as $base ($("$docker" run --rm --network none "$base" python3 --version))"
