#!/bin/sh
# A stand-in for the Redis image that deploy/docker-compose.yml names (redis:7), for a machine
# that reaches Debian's package registry but no image registry: Debian bookworm (debootstrap
# minbase) with its redis-server (7.0), imported into the local Docker engine under that name, so
# that `docker compose up` finds it there instead of pulling it. A sibling of base-image.sh.
#
#   deploy/docker/redis-stand-in.sh          # as root, once; then, with the streamcast image built:
#   SP500_CSV=/path/to/sp500.csv docker compose -f deploy/docker-compose.yml \
#       up -d --scale streamcast=3 redis streamcast replay
#
# It behaves as the official image does where the Compose file relies on it: the command is
# `redis-server ARGS...` (or only the ARGS: the entrypoint puts redis-server before an option),
# redis-cli is on the PATH (the healthcheck), /data is a volume and the working directory (so the
# append-only file lands in the named volume), the server runs as the user redis (the entrypoint
# gives /data to it first, as the official one does), and protected mode is off when the server
# is started with options only, as the Compose file does (the official image is built so: clients
# come from other containers, never from the loopback address that protected mode lets in); given
# a config file, this stand-in leaves protected mode to the file (on, unless the file says no).
#
# An image of that name that this script did not make (the real one, pulled) is left alone; one
# it made is rebuilt only when this script or stand-in.sh changes, so a second run takes a second.
# DEBIAN_MIRROR overrides the mirror read from apt's sources; DOCKER the docker client.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
label=org.streamcast.stand-in

# the first redis image the Compose file names
image=$(sed -n 's/^ *image: *\(redis:[^ ]*\) *$/\1/p' "$repo/deploy/docker-compose.yml" | head -n 1)
[ -n "$image" ] || { echo "redis-stand-in.sh: no redis image in deploy/docker-compose.yml" >&2; exit 1; }
docker=${DOCKER:-docker}
name=redis-stand-in.sh
. "$here/stand-in.sh"

recipe=$(cat "$0" "$here/stand-in.sh" | sha256sum | cut -c1-16)

stand_in_needed "$image" "$recipe"
# redis-server's maintainer scripts start no server in the chroot: debootstrap fakes
# start-stop-daemon while it installs, and no init runs there
debootstrap_rootfs redis-server,redis-tools
grep -q '^redis:' "$rootfs/etc/passwd" || { echo "redis-stand-in.sh: no user redis" >&2; exit 1; }

# The data directory, the redis user's (a new named volume takes its owner from the image's).
mkdir -p "$rootfs/data"
chroot "$rootfs" chown redis:redis /data

# The official image's entrypoint, in short: options alone run redis-server; redis-server runs as
# the user redis, with protected mode off unless a config file (which must come first) is given.
cat >"$rootfs/usr/local/bin/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
set -e
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
    set -- redis-server "$@"
fi
if [ "$1" = redis-server ]; then
    shift
    case "${1:-}" in
        *.conf | -v | --version | -h | --help | --test-memory | --check-system) ;;
        *) set -- --protected-mode no "$@" ;;  # later arguments still override it
    esac
    set -- redis-server "$@"
    if [ "$(id -u)" = 0 ]; then
        find . \! -user redis -exec chown redis '{}' +
        exec setpriv --reuid=redis --regid=redis --init-groups "$@"
    fi
fi
exec "$@"
EOF
chmod 755 "$rootfs/usr/local/bin/docker-entrypoint.sh"

slim_rootfs

import_stand_in "$image" \
    --change "VOLUME /data" \
    --change "WORKDIR /data" \
    --change "EXPOSE 6379" \
    --change 'ENTRYPOINT ["docker-entrypoint.sh"]' \
    --change 'CMD ["redis-server"]'
echo "redis-stand-in.sh: imported the stand-in as $image ($("$docker" run --rm --network none "$image" redis-server --version | cut -d' ' -f1-3))"
