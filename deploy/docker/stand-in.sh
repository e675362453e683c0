# What base-image.sh and redis-stand-in.sh share (sourced by both, not run): whether an image
# needs a stand-in at all, and a Debian bookworm root file system made by debootstrap.
#
# Each caller sets `name` (its own, for messages), `docker` (the client) and `label` first, and
# `recipe` before import_stand_in.

# stand_in_needed IMAGE RECIPE: exits the calling script (0) when IMAGE is present and either not
# a stand-in (a real image, pulled: left alone) or a stand-in of this RECIPE (up to date); sets
# `old` to the image id a new stand-in replaces (empty when there is none).
stand_in_needed() {
    old=
    # an engine that does not answer (yet) must not read as "no such image": a real one would
    # then be replaced
    "$docker" info >/dev/null 2>&1 || {
        echo "$name: the Docker engine does not answer ($docker info)" >&2
        exit 1
    }
    "$docker" image inspect "$1" >/dev/null 2>&1 || return 0
    old=$("$docker" image inspect -f '{{.Id}}' "$1")
    made=$("$docker" image inspect -f "{{ index .Config.Labels \"$label\" }}" "$1")
    case "$made" in
        "" | "<no value>")
            echo "$name: $1 is present and not a stand-in: left as it is"
            exit 0 ;;
        "$2")
            echo "$name: the stand-in $1 is up to date"
            exit 0 ;;
    esac
}

# debootstrap_rootfs PACKAGES: bookworm (minbase, with the comma-separated PACKAGES) in a new
# directory, `rootfs`, removed when the calling script exits. DEBIAN_MIRROR overrides the mirror
# read from apt's sources.
debootstrap_rootfs() {
    [ "$(id -u)" = 0 ] || { echo "$name: debootstrap needs root" >&2; exit 1; }
    command -v debootstrap >/dev/null || {
        echo "$name: debootstrap is not installed (apt-get install -y debootstrap)" >&2
        exit 1
    }
    mirror=${DEBIAN_MIRROR:-}
    if [ -z "$mirror" ] && [ -f /etc/apt/sources.list.d/debian.sources ]; then
        mirror=$(awk '$1 == "URIs:" { print $2; exit }' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
        mirror=$(awk '$1 == "deb" && $3 ~ /^bookworm$/ { print $2; exit }' /etc/apt/sources.list)
    fi
    rootfs=$(mktemp -d /var/tmp/streamcast-stand-in.XXXXXX)
    trap _remove_rootfs EXIT
    trap 'exit 1' INT TERM
    echo "$name: debootstrap bookworm into $rootfs (${mirror:-debootstrap's default mirror})"
    debootstrap --variant=minbase --include="$1" bookworm "$rootfs" ${mirror:+"$mirror"} \
        >"$rootfs.log" 2>&1 || {
        tail -n 30 "$rootfs.log" >&2
        echo "$name: debootstrap failed (log: $rootfs.log)" >&2
        exit 1
    }
    rm -f "$rootfs.log"
}

_remove_rootfs() {
    # a debootstrap that failed midway can leave its mounts behind: never delete through them
    for mount in proc sys dev/pts dev; do umount "$rootfs/$mount" 2>/dev/null || true; done
    rm -rf --one-file-system "$rootfs"
    rm -f "$rootfs.tar"
}

# import_stand_in IMAGE [--change INSTRUCTION]...: the root file system imported as IMAGE, labelled
# with the recipe, UTF-8 and the usual PATH, plus the caller's instructions; the stand-in it
# replaces is removed (unless a container still uses it). The archive is written to a file first:
# sh has no pipefail, and a tar that failed inside a pipe would import a truncated image.
import_stand_in() {
    image_name=$1
    shift
    tar -C "$rootfs" --numeric-owner -cf "$rootfs.tar" . || {
        rm -f "$rootfs.tar"
        echo "$name: could not archive $rootfs" >&2
        exit 1
    }
    "$docker" import \
        --change "LABEL $label=$recipe" \
        --change "ENV LANG=C.UTF-8" \
        --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        "$@" "$rootfs.tar" "$image_name" >/dev/null || {
        rm -f "$rootfs.tar"
        echo "$name: docker import of $image_name failed" >&2
        exit 1
    }
    rm -f "$rootfs.tar"
    [ -z "$old" ] || "$docker" image rm "$old" >/dev/null 2>&1 || true
}

# slim_rootfs: as the official slim images, no package lists or caches; the engine supplies the
# rest (resolv.conf, hostname).
slim_rootfs() {
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/usr/share/man/* \
        "$rootfs"/usr/share/info/* "$rootfs/etc/resolv.conf" "$rootfs/etc/hostname"
}
