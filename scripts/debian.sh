# Sourced by scripts/setup.sh and scripts/test.sh.
# debian_install PACKAGE WHAT-FOR NOTE: install a Debian package where this runs as root
# with apt-get; elsewhere print NOTE (what will not work without it) and go on.
debian_install() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing $1 (Debian package): $2"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
    else
        echo "note: $3" >&2
    fi
}
