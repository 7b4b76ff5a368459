#!/usr/bin/env bash
# Builds the Debian package with cargo-deb and checks it end to end on this
# machine, as root: contents and modes, lintian, install, the installed units,
# the stripped binary and its separate debug symbols, reinstall, removal (state
# and secrets kept) and purge (everything gone). CI runs it; so can you:
#   sudo bash dist/debian/check.sh
# It installs and then purges the `tunneld` package on the machine it runs on.
set -euo pipefail
cd "$(dirname "$0")/../.."

fail() { echo "check.sh: FAIL: $*" >&2; exit 1; }
step() { echo "--- $*"; }

[ "$(id -u)" = 0 ] || fail "run as root (it installs and purges the package)"
command -v cargo-deb >/dev/null || fail "cargo-deb is not installed: cargo install cargo-deb --locked"

step "cargo deb"
rm -rf target/debian
cargo deb --quiet >/dev/null
deb=$(ls target/debian/tunneld_*.deb)
dbgsym=$(ls target/debian/tunneld-dbgsym_*.ddeb)

step "contents and modes of $deb"
contents=$(dpkg-deb --contents "$deb" | awk '{print $1, $2, $6}')
expect() {
    grep -qxF -e "$1" <<<"$contents" || { echo "$contents" >&2; fail "package lacks: $1"; }
}
expect "-rwxr-xr-x 0/0 ./usr/bin/tunneld"
expect "-rw-r--r-- 0/0 ./usr/lib/systemd/system/tunneld-server.service"
expect "-rw-r--r-- 0/0 ./usr/lib/systemd/system/tunneld-client.service"
expect "-rw-r--r-- 0/0 ./etc/tunneld/server.toml"
expect "-rw-r--r-- 0/0 ./etc/tunneld/client.toml"
expect "-rw-r--r-- 0/0 ./usr/share/doc/tunneld/copyright"
expect "-rw-r--r-- 0/0 ./usr/share/doc/tunneld/operations.md"
expect "-rw-r--r-- 0/0 ./usr/share/doc/tunneld/high-availability.md"
expect "-rw-r--r-- 0/0 ./usr/share/tunneld/grafana/tunneld.json"
expect "-rw-r--r-- 0/0 ./usr/share/tunneld/prometheus/alerts.yml"
# Secrets are never shipped: postinst creates the env files.
if grep -q '\.env$' <<<"$contents"; then fail "package ships an env file"; fi
conffiles=$(dpkg-deb --info "$deb" conffiles)
grep -qx /etc/tunneld/server.toml <<<"$conffiles" || fail "server.toml is not a conffile"
grep -qx /etc/tunneld/client.toml <<<"$conffiles" || fail "client.toml is not a conffile"
dpkg-deb --contents "$dbgsym" | grep -q '/usr/lib/debug/.build-id/.*\.debug$' || fail "no .debug file in $dbgsym"

step "lintian (errors fail)"
lintian --fail-on error --suppress-tags initial-upload-closes-no-bugs "$deb"

step "dpkg -i"
dpkg -i "$deb" "$dbgsym" >/dev/null
test -x /usr/bin/tunneld || fail "/usr/bin/tunneld missing after install"
/usr/bin/tunneld version | grep -q "^tunneld " || fail "tunneld version did not run from /usr/bin"
for role in server client; do
    [ "$(stat -c '%a %U' /etc/tunneld/$role.env)" = "600 root" ] || fail "/etc/tunneld/$role.env is not 0600 root"
done
effective=$(/usr/bin/tunneld check-config --config /etc/tunneld/server.toml server) || fail "installed server.toml does not pass check-config"
# The unit's StateDirectory=tunneld, named in the file so that commands typed in
# a shell (tunneld fingerprint, ctl) find the service's state too.
grep -qx 'state_dir = "/var/lib/tunneld"' <<<"$effective" || fail "installed server.toml does not name /var/lib/tunneld"

step "systemd-analyze verify on the installed units"
verify=$(systemd-analyze verify /usr/lib/systemd/system/tunneld-server.service /usr/lib/systemd/system/tunneld-client.service 2>&1) \
    || { echo "$verify" >&2; fail "systemd-analyze verify failed"; }
[ -z "$verify" ] || { echo "$verify" >&2; fail "systemd-analyze verify warned"; }
# Installed, not enabled: postinst enables and starts nothing.
if [ -e /etc/systemd/system/multi-user.target.wants/tunneld-server.service ]; then fail "postinst enabled the server unit"; fi

step "stripped binary; line numbers through the dbgsym package"
if readelf -S /usr/bin/tunneld | grep -q '\.debug_line'; then fail "/usr/bin/tunneld still has line tables"; fi
if readelf -s /usr/bin/tunneld | grep -q 'tunneld3cli4main'; then fail "/usr/bin/tunneld still has its symbol table"; fi
# gdb finds /usr/lib/debug/.build-id/<id>.debug by the binary's build id, as a
# crash report's tooling (and Rust's own backtraces) do.
# `main` names both src/main.rs's one-line wrapper (a bare jump, no line of its
# own) and `tunneld::cli::main`, which holds the program's entry code.
line=$(gdb -nx -batch -ex 'info line main' /usr/bin/tunneld 2>&1)
grep -q 'Line [0-9]* of "src/cli/mod.rs"' <<<"$line" || { echo "$line" >&2; fail "gdb cannot map main (tunneld::cli::main) to a source line"; }
echo "installed size: $(dpkg-query -W -f '${Installed-Size}' tunneld) KiB (binary $(stat -c %s /usr/bin/tunneld) bytes; debug symbols $(dpkg-query -W -f '${Installed-Size}' tunneld-dbgsym) KiB in tunneld-dbgsym)"

step "reinstall keeps the operator's secrets"
echo 'TUNNELD_SERVER__SECRET=kept-across-reinstall' >>/etc/tunneld/server.env
dpkg -i "$deb" >/dev/null
grep -q kept-across-reinstall /etc/tunneld/server.env || fail "reinstall overwrote /etc/tunneld/server.env"

step "dpkg -r keeps state and secrets"
mkdir -p /var/lib/tunneld && echo state >/var/lib/tunneld/check-marker
dpkg -r tunneld-dbgsym tunneld >/dev/null
[ ! -e /usr/bin/tunneld ] || fail "/usr/bin/tunneld left after dpkg -r"
[ ! -e /usr/lib/systemd/system/tunneld-server.service ] || fail "unit left after dpkg -r"
grep -q kept-across-reinstall /etc/tunneld/server.env || fail "dpkg -r removed the server's secrets"
[ -f /etc/tunneld/client.env ] || fail "dpkg -r removed /etc/tunneld/client.env"
[ -f /var/lib/tunneld/check-marker ] || fail "dpkg -r removed /var/lib/tunneld"

step "dpkg --purge removes secrets, configuration and state"
dpkg --purge tunneld >/dev/null
for gone in /etc/tunneld /var/lib/tunneld; do
    [ ! -e "$gone" ] || fail "$gone left after purge"
done
dpkg-query -W tunneld >/dev/null 2>&1 && fail "tunneld still known to dpkg after purge"

echo "check.sh: the Debian package passed every check"
