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
# it made is rebuilt only when its recipe changes (this script and stand-in.sh, the CA bundle,
# the pip settings), so a second run takes a second. DEBIAN_MIRROR overrides the mirror read
# from apt's sources.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
label=org.streamcast.stand-in

base=$(awk 'toupper($1) == "FROM" { print $2; exit }' "$repo/Dockerfile")
[ -n "$base" ] || { echo "base-image.sh: no FROM line in $repo/Dockerfile" >&2; exit 1; }
docker=${DOCKER:-docker}
name=base-image.sh
. "$here/stand-in.sh"

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

recipe=$({ cat "$0" "$here/stand-in.sh" "$bundle"; printf '%s\n' "$pip_conf"; } | sha256sum | cut -c1-16)

stand_in_needed "$base" "$recipe"
debootstrap_rootfs python3,python3-venv,python3-pip,ca-certificates,passwd

# Trust what the machine trusts; its own added certificates survive an update-ca-certificates run
# inside the image.
cp "$bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
if [ -d /usr/local/share/ca-certificates ]; then
    cp -R /usr/local/share/ca-certificates/. "$rootfs/usr/local/share/ca-certificates/"
fi
printf '%s\n' "$pip_conf" >"$rootfs/etc/pip.conf"

slim_rootfs

import_stand_in "$base" --change 'CMD ["python3"]'
echo "base-image.sh: imported the stand-in as $base ($("$docker" run --rm --network none "$base" python3 --version))"
