# Helpers of install.sh that decide from facts of this machine, sourced by it (and by tests).
# shellcheck shell=bash

# The interpreter a venv's python runs (a venv made from another venv's python names its base).
base_python() { "$1" -c 'import os, sys; print(os.path.realpath(sys._base_executable))' 2>/dev/null; }

# A directory only root can change: root owns it, it is no symlink, and group and others
# cannot write it, unless it is sticky (like /tmp: nobody can rename what is not theirs).
root_only_dir() {
  local mode
  [[ -d $1 && ! -L $1 && $(stat -c %u "$1") == 0 ]] || return 1
  mode=8#$(stat -c %a "$1")
  ((!(mode & 8#022) || (mode & 8#1000)))
}

# Where pip unpacks GBs of wheels on the NVMe, in a place only root can change: the nearest
# directory at or above DIR that is root-only, and all of whose parents are too. Never one the
# service user owns (or that sits in one), which could swap what pip builds between mktemp
# and install. Prints "/" when there is none.
safe_tmp_parent() {
  local dir=$1 up
  while [[ $dir != / ]]; do
    if root_only_dir "$dir"; then
      up=$dir
      while [[ $up != / ]] && root_only_dir "$up"; do up=$(dirname "$up"); done
      [[ $up == / ]] && break
      dir=$up  # a parent the service user (or anyone) can change: look above it
    fi
    dir=$(dirname "$dir")
  done
  printf '%s\n' "$dir"
}
