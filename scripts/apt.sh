# shellcheck shell=bash
# Sourced by install.sh and scripts/test.sh: Debian packages that are missing, and installing them.

# apt_missing PKG...: prints each PKG that dpkg does not list as installed.
apt_missing() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}

# apt_install PKG...: installs the missing ones (through sudo when not root); quiet otherwise.
apt_install() {
  local need sudo_cmd=()
  mapfile -t need < <(apt_missing "$@")
  ((${#need[@]})) || return 0
  echo "installing system packages: ${need[*]}"
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
    "${need[@]}" >/dev/null
}
