#!/usr/bin/env bash
# install.sh: provision an edge room device (a Jetson, or any Debian/Ubuntu box) in one command.
# Idempotent: run it again after `git pull`; a run with nothing to do says "unchanged" per step.
# Bash does the steps; decisions that need facts about the machine (platform, which disk the
# model cache goes on, free space, memory limits) come from `python3 -m edge.provision`, the
# same code `edge check` reports with.
set -Eeuo pipefail  # -E: the ERR trap below fires inside functions too

usage() {
  cat <<'EOF'
Usage: sudo ./install.sh [options]

Installs edge into a venv under /opt/edge, the system user `edge` (sysusers.d), the unit
edge.service, writes /etc/edge/edge.env once (never overwritten), picks the model cache dir
(an NVMe mount with room, else /var/cache/edge), prefetches the model when online, and
enables and starts the unit when systemd runs.

Options:
  --dry-run        print what would be done; write nothing
  --destdir DIR    install into DIR (image builds, tests): no systemctl, no user created
  --uninstall      remove the venv, the unit and its drop-ins; keep /etc/edge and the cache
  --no-nemo        no torch and NeMo (transcripts still flow; with --exported, the diarizer
                   runs on ONNX Runtime alone)
  --no-model       do not prefetch (nor export) the diarization model
  --exported DIR   install a pre-exported model folder (`edge model export --out DIR` on a
                   build machine) into NEMO_CACHE_DIR/exported/; with --no-nemo only
                   onnxruntime and numpy go into the venv for the worker
  --foreground     without systemd, run the daemon in this terminal after installing
  --cache-dir DIR  the model cache (default: chosen; NEMO_CACHE_DIR in the env file wins);
                   an existing DIR is left as it is and the cache is DIR/edge-cache
  --python PATH    the interpreter the venv is made from (default: /usr/bin/python3 when it
                   exists, else python3; >= 3.10, runnable by the user edge)
  --wheels DIR     a local wheel directory: pip's --find-links for every install, and torch
                   from it when it holds a torch wheel (no index needed)
  --torch-default-index
                   when the PyTorch CPU index cannot be reached, take torch from pip's
                   default index instead (on x86_64 that is the CUDA build: ~4 GB)
  -h, --help       this text

Environment:
  EDGE_TORCH_INDEX       pip index for torch (default: NVIDIA's Jetson wheels on a Jetson,
                         the CPU build elsewhere; set it empty for pip's configured index)
  EDGE_ORT_INDEX         pip index for onnxruntime with the CUDA provider on a Jetson
                         (default: the same NVIDIA index as torch)
  EDGE_TORCH_SPEC        which torch, e.g. "torch==2.8.0" (default: torch)
  EDGE_INSTALL_PIP_ARGS  extra pip arguments, e.g. "--no-index --find-links /srv/wheels"
  EDGE_INSTALL_NEED_VENV_MB / EDGE_INSTALL_NEED_CACHE_MB
                         free space required (defaults 4096 with NeMo, 512 without / 1024)
  EDGE_INSTALL_PROBE_ROOT, EDGE_INSTALL_DF
                         read /proc, /sys and /etc under another root, and free space from
                         `df -B1 --output=target,avail` text in a file (tests)

Exit status: 0 installed or nothing to do (warnings, e.g. "model not prefetched", are
printed and do not fail the install), 1 a step failed, 2 bad usage, 3 not enough free space.
EOF
}

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/install-lib.sh
. "$SRC/scripts/install-lib.sh"
PREFIX=/opt/edge
VENV=$PREFIX/venv
STAMP=$PREFIX/install.stamp
UNIT_DIR=/etc/systemd/system
UNIT=$UNIT_DIR/edge.service
DROPINS=$UNIT_DIR/edge.service.d
WANTS_LINK=$UNIT_DIR/multi-user.target.wants/edge.service
ENV_FILE=/etc/edge/edge.env
SYSUSERS=/usr/lib/sysusers.d/edge.conf
STATE_DIR=/var/lib/edge
JETSON_TORCH_INDEX=https://pypi.jetson-ai-lab.io/jp6/cu126
CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu
MODEL_HOST=https://huggingface.co
EXPORT_MARKER=edge-export.json  # edge.diarization.exports.MARKER: written last by `edge model export`

dry_run=0 uninstall=0 nemo=1 fetch_model=1 foreground=0 torch_default_index=0
D="" cache_opt="" PY="" wheels="" exported=""
while (($#)); do
  case $1 in
    --dry-run) dry_run=1 ;;
    --destdir) [[ -n ${2:-} ]] || { usage >&2; exit 2; }; D=$(realpath -m "$2"); shift ;;
    --uninstall) uninstall=1 ;;
    --no-nemo) nemo=0 ;;
    --no-model) fetch_model=0 ;;
    --foreground) foreground=1 ;;
    --cache-dir) [[ -n ${2:-} ]] || { usage >&2; exit 2; }; cache_opt=$(realpath -m "$2"); shift ;;
    --python) [[ -n ${2:-} ]] || { usage >&2; exit 2; }; PY=$2; shift ;;
    --wheels) [[ -n ${2:-} ]] || { usage >&2; exit 2; }; wheels=$(realpath -m "$2"); shift ;;
    --exported) [[ -n ${2:-} ]] || { usage >&2; exit 2; }; exported=$(realpath -m "$2"); shift ;;
    --torch-default-index) torch_default_index=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

# A system service runs as `edge`: the system interpreter, not whatever python3 is first on
# root's PATH (a pyenv under /root, which edge cannot even enter).
if [[ -z $PY ]]; then
  PY=python3
  [[ -x /usr/bin/python3 ]] && PY=/usr/bin/python3
fi
[[ -z $wheels || -d $wheels ]] || { echo "install.sh: --wheels $wheels: not a directory" >&2; exit 2; }
if [[ -n $exported && ! -f $exported/$EXPORT_MARKER ]]; then
  echo "install.sh: --exported $exported: no $EXPORT_MARKER in it (not an \`edge model export\` folder)" >&2
  exit 2
fi

changes=0 warnings=0
say() { printf '%-8s %s\n' "$1" "${*:2}"; }  # say STEP WORDS...
warn() { say "$1" "warning: $2"; warnings=$((warnings + 1)); }
die() { echo "install.sh: $1" >&2; exit "${2:-1}"; }
# A step that fails says which command, so the operator is not left with a bare traceback.
trap 'echo "install.sh: failed (exit $?): $BASH_COMMAND" >&2; exit 1' ERR
live() { [[ -z $D ]] && ((!dry_run)); }  # acting on this machine itself
# systemd manages services only when it is PID 1 (sd_booted(3)); never for a --destdir.
systemd_running=0
[[ -z $D && -d /run/systemd/system ]] && systemd_running=1

# put_file STEP PATH MODE: PATH gets stdin's text, written only when it differs (spares the
# SD card, and a second run reports "unchanged").
put_file() {
  local step=$1 path=$2 mode=$3 text
  text=$(cat)
  if [[ -f $D$path ]] && printf '%s\n' "$text" | cmp -s - "$D$path"; then
    say "$step" "unchanged $path"
  elif ((dry_run)); then
    say "$step" "would write $path"
  else
    mkdir -p "$(dirname "$D$path")"
    printf '%s\n' "$text" >"$D$path.tmp"
    chmod "$mode" "$D$path.tmp"
    mv -f "$D$path.tmp" "$D$path"
    say "$step" "wrote $path"
    changes=1
  fi
}

# remove STEP PATH...: deletes what exists (a tree for directories).
remove() {
  local step=$1 path
  shift
  for path in "$@"; do
    if [[ ! -e $D$path && ! -L $D$path ]]; then
      continue
    elif ((dry_run)); then
      say "$step" "would remove $path"
    else
      rm -rf -- "$D$path"
      say "$step" "removed $path"
      changes=1
    fi
  done
}

# ensure_dir STEP PATH: exists, mode 0750, and on this machine owned by edge.
ensure_dir() {
  local step=$1 path=$2 owned=1
  live && [[ -d $path && $(stat -c %U "$path") != edge ]] && owned=0
  if [[ -d $D$path ]] && ((owned)); then
    say "$step" "unchanged $path"
  elif ((dry_run)); then
    say "$step" "would create $path"
  else
    local did="created"
    [[ -d $D$path ]] && did="handed to the user edge:"
    install -d -m 0750 "$D$path"
    # Not recursive: --cache-dir may name a directory that holds other things too.
    if live; then chown edge:edge "$path"; fi
    say "$step" "$did $path"
    changes=1
  fi
}

# --- steps ---

step_packages() {
  # What the venv needs, and when systemd runs what systemd-python (sd_notify for
  # Type=notify) builds with. Only on the machine itself: a --destdir is someone else's root.
  [[ -z $D ]] && command -v apt-get >/dev/null || return 0
  local pkgs=(python3 python3-venv) need
  ((systemd_running)) && pkgs+=(libsystemd-dev pkg-config gcc python3-dev)
  # shellcheck source=scripts/apt.sh
  . "$SRC/scripts/apt.sh"
  mapfile -t need < <(apt_missing "${pkgs[@]}")
  if ((${#need[@]} == 0)); then
    say packages "unchanged (${pkgs[*]})"
  elif ((dry_run)); then
    say packages "would install ${need[*]}"
  else
    apt_install "${need[@]}" | sed 's/^/packages /'
    changes=1
  fi
}

check_python() {
  "$PY" -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 10))' 2>/dev/null ||
    die "$PY: Python >= 3.10 with venv and ensurepip needed (apt-get install python3-venv)"
}


# Before anything is installed: the service user must be able to run the interpreter the venv
# is made from (a pyenv under /root passes as root and fails only when the unit starts).
check_python_for_edge() {
  live || return 0
  runuser -u edge -- "$(base_python "$PY")" -c 'import encodings, venv' 2>/dev/null ||
    die "the user edge cannot run $PY ($(base_python "$PY")): a system service needs an interpreter every user can run; use --python /usr/bin/python3"
}

# The install stamp: what went into the venv. The same stamp next run means nothing to do.
venv_stamp() {
  {
    "$PY" -c 'import sys; print(sys.executable, sys.version)'
    printf 'extras=%s torch=%s %s pip_args=%s wheels=%s\n' "$extras" "${EDGE_TORCH_SPEC:-torch}" \
      "${EDGE_TORCH_INDEX-default}" "${EDGE_INSTALL_PIP_ARGS:-}" "$wheels"
    (cd "$SRC" && find pyproject.toml edge -type f ! -path '*/__pycache__/*' -print0 |
      LC_ALL=C sort -z | xargs -0 sha256sum)
  } | sha256sum | cut -d' ' -f1
}

# python3 -m edge.provision from the source tree: the venv may not exist yet. No .pyc files:
# a --dry-run writes nothing, not even into the checkout.
provision() { PYTHONPATH="$SRC" PYTHONDONTWRITEBYTECODE=1 "$PY" -m edge.provision "$@"; }

declare -A probe=()
step_probe() {
  local args=(probe --root "${EDGE_INSTALL_PROBE_ROOT:-/}" --env-file "$D$ENV_FILE"
    --venv-dir "$D$PREFIX" --venv "$venv_kind") out key value
  [[ -n ${EDGE_INSTALL_DF:-} ]] && args+=(--df "$EDGE_INSTALL_DF")
  [[ -n $cache_opt ]] && args+=(--cache-dir "$cache_opt")
  [[ -n $cache_opt && -d $D$cache_opt ]] && args+=(--cache-dir-exists)
  [[ -n ${EDGE_INSTALL_NEED_VENV_MB:-} ]] && args+=(--need-venv-mb "$EDGE_INSTALL_NEED_VENV_MB")
  [[ -n ${EDGE_INSTALL_NEED_CACHE_MB:-} ]] && args+=(--need-cache-mb "$EDGE_INSTALL_NEED_CACHE_MB")
  # Only a model download needs the room now; without one the choice alone matters.
  ((fetch_model && nemo)) && [[ -z $D ]] && args+=(--check-cache-space)
  out=$(provision "${args[@]}" 2>&1) || die "$out" $?
  while IFS='=' read -r key value; do
    if [[ $key == warning ]]; then warn cache "$value"; else probe[$key]=$value; fi
  done <<<"$out"
  say platform "${probe[platform_desc]}"
  say cache "${probe[cache_dir]} (${probe[cache_kind]}${probe[cache_device]:+ ${probe[cache_device]}}, ${probe[cache_free_mb]} MB free; ${probe[cache_reason]})"
}

step_user() {
  put_file user "$SYSUSERS" 0644 <<'EOF'
# The system user the edge daemon runs as (install.sh). systemd-sysusers creates it at boot
# where install.sh did not; video/render own the Jetson GPU nodes.
g video - -
g render - -
u edge - "edge speech appliance" /var/lib/edge
m edge video
m edge render
EOF
  if [[ -n $D ]]; then
    return 0  # systemd-sysusers creates the user on the image's first boot
  elif id -u edge >/dev/null 2>&1; then
    say user "unchanged (edge exists)"
  elif ((dry_run)); then
    say user "would create the system user edge"
  elif command -v systemd-sysusers >/dev/null; then
    systemd-sysusers "$SYSUSERS" 2>&1 | sed 's/^/user     /'
    say user "created edge (systemd-sysusers)"
    changes=1
  else
    groupadd -f -r video
    groupadd -f -r render
    useradd -r -U -d "$STATE_DIR" -M -s /usr/sbin/nologin -G video,render \
      -c "edge speech appliance" edge
    say user "created edge (useradd)"
    changes=1
  fi
}

pip_install() {
  local quiet=() extra=()
  [[ -t 1 ]] || quiet=(-q)  # progress bars for a person, quiet logs for automation
  read -ra extra <<<"${EDGE_INSTALL_PIP_ARGS:-}"
  [[ -n $wheels ]] && extra+=(--find-links "$wheels")
  # --no-cache-dir: the wheels are not kept on the SD card.
  "$D$VENV/bin/python" -m pip install --no-cache-dir --disable-pip-version-check \
    "${quiet[@]}" "${extra[@]}" "$@"
}

step_venv() {
  if [[ $venv_kind == none ]]; then
    say venv "unchanged $VENV"
    return 0
  elif ((dry_run)); then
    say venv "would create $VENV and install edge[$extras]"
    return 0
  fi
  local site=() constraints=() build have want pkg_extras=$extras
  # A Jetson's system Python may already hold NVIDIA's CUDA torch: reuse it, do not replace it.
  if [[ ${probe[platform]} == jetson ]] && ((nemo)) && "$PY" -c 'import torch' 2>/dev/null; then
    site=(--system-site-packages)
  fi
  # A venv made from another interpreter (a pyenv, an older python3), or one the service user
  # cannot run, is rebuilt: pip would otherwise add to it and the unit would still fail.
  if [[ -e $D$VENV/bin/python || -L $D$VENV/bin/python ]]; then
    have=$(base_python "$D$VENV/bin/python" || true) want=$(base_python "$PY")
    if [[ $have != "$want" ]]; then
      say venv "rebuilding $VENV: made from ${have:-an interpreter that no longer runs}, not $want"
      rm -rf "$D$VENV"
    elif live && ! runuser -u edge -- "$VENV/bin/python" -c '' 2>/dev/null; then
      say venv "rebuilding $VENV: the user edge cannot run it"
      rm -rf "$D$VENV"
    fi
  fi
  [[ -x $D$VENV/bin/python ]] || "$PY" -m venv "${site[@]}" "$D$VENV"
  if ((nemo)); then
    "$D$VENV/bin/python" -c 'import torch' 2>/dev/null || install_torch
  elif [[ $extras == *onnx* && ${probe[platform]} == jetson ]]; then
    # The onnx worker with the CUDA provider: NVIDIA's onnxruntime-gpu from its Jetson index,
    # in place of the `onnx` extra's CPU build (both would install the module onnxruntime).
    say venv "installing onnxruntime-gpu from ${EDGE_ORT_INDEX:-$JETSON_TORCH_INDEX}"
    pip_install --index-url "${EDGE_ORT_INDEX:-$JETSON_TORCH_INDEX}" onnxruntime-gpu
    pkg_extras=$(sed -E 's/(^|,)onnx(,|$)/\1/; s/,$//' <<<"$extras")
  fi
  if ((nemo)); then
    # Pin the torch we have, so NeMo's requirements cannot swap it for another build. The
    # public version: "==2.8.0" is met by the installed 2.8.0+cu126, and pip's resolver does
    # not find "==2.8.0+cu126" outside the index that build came from.
    "$D$VENV/bin/python" -W ignore -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' \
      >"$D$PREFIX/constraints.txt"
    constraints=(-c "$D$PREFIX/constraints.txt")
  fi
  say venv "installing edge[$pkg_extras] into $VENV"
  # From a copy: a build in the checkout leaves build/ behind, whose stale modules a later
  # build would package again.
  build=$(mktemp -d)
  cp -r "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/edge" "$build/"
  pip_install "${constraints[@]}" "$build${pkg_extras:+[$pkg_extras]}"
  rm -rf "$build"
  [[ -z $D ]] || relocate_venv
  # A venv made from an interpreter the service user cannot reach (a pyenv under /root) would
  # only fail when the unit starts: say so now, and write no stamp.
  if live && ! runuser -u edge -- "$VENV/bin/python" -c 'import edge' 2>/dev/null; then
    die "the user edge cannot run $VENV/bin/python (made from $PY): use --python /usr/bin/python3"
  fi
  printf '%s\n' "$stamp" >"$D$STAMP"
  say venv "installed $("$D$VENV/bin/python" -c 'import edge; print("edge", edge.__version__)')"
  if ((nemo)); then
    say venv "torch $("$D$VENV/bin/python" -W ignore -c 'import torch
cuda = torch.version.cuda
print(torch.__version__, f"(CUDA {cuda} build)" if cuda else "(CPU build)")' 2>/dev/null || echo "not importable")"
  fi
  changes=1
}

# torch before NeMo, from where this platform's build comes: --wheels DIR when it holds one;
# else the index (NVIDIA's on a Jetson, PyTorch's CPU index elsewhere), checked first in one
# line, so an unreachable index fails in seconds, not after minutes of pip retries.
install_torch() {
  local index spec=${EDGE_TORCH_SPEC:-torch}
  if [[ -n $wheels ]] && compgen -G "$wheels/torch-*.whl" >/dev/null; then
    say venv "installing $spec from $wheels"
    pip_install --no-index "$spec"
    return 0
  fi
  if [[ ${probe[platform]} == jetson ]]; then
    index=${EDGE_TORCH_INDEX-$JETSON_TORCH_INDEX}
  else
    index=${EDGE_TORCH_INDEX-$CPU_TORCH_INDEX}  # never PyPI's CUDA build off a Jetson unasked
  fi
  if [[ -n $index ]] && ! provision online "$index" --timeout 5; then
    if ((!torch_default_index)); then
      die "the torch index $index did not answer in 5 s: use --wheels DIR (a local wheel directory), EDGE_TORCH_INDEX=<a mirror>, or --torch-default-index (pip's default index)"
    fi
    warn venv "$index did not answer in 5 s: torch from pip's default index instead (on x86_64 the CUDA build, ~4 GB with its libraries)"
    index=""
  fi
  say venv "installing $spec${index:+ from $index}"
  if [[ -n $index ]]; then
    pip_install --index-url "$index" "$spec"
  else
    pip_install "$spec"
  fi
}


relocate_venv() {
  # A venv writes its own path into scripts and pyvenv.cfg; built under DESTDIR it must name
  # the path it will have on the device.
  local f
  { grep -rlIF -- "$D$VENV" "$D$VENV/bin" "$D$VENV/pyvenv.cfg" || true; } | while IFS= read -r f; do
    sed -i "s|$D$VENV|$VENV|g" "$f"
  done
}

step_config() {
  if [[ -e $D$ENV_FILE ]]; then
    say config "unchanged $ENV_FILE (an existing env file is never overwritten)"
    return 0
  fi
  sed "s|^NEMO_CACHE_DIR=.*|NEMO_CACHE_DIR=${probe[cache_dir]}|" "$SRC/systemd/edge.env.example" |
    put_file config "$ENV_FILE" 0640
  # Secrets go in here: root writes it, the service user reads it (the unit's EnvironmentFile
  # is read by systemd; `edge` run by hand as the user reads it too).
  live && chgrp edge "$ENV_FILE"
  return 0
}

step_unit() {
  put_file unit "$UNIT" 0644 <"$SRC/systemd/edge.service"
  put_file unit "$PREFIX/README.md" 0644 <"$SRC/README.md"  # the unit's Documentation=
  put_file unit "$DROPINS/memory.conf" 0644 <<EOF
# Written by install.sh from EDGE_DIARIZATION_MEMORY_MB=${probe[memory_budget_mb]} plus the daemon's own.
[Service]
MemoryHigh=${probe[memory_high]}
MemoryMax=${probe[memory_max]}
EOF
  if [[ ${probe[cache_managed]} == yes ]]; then
    remove unit "$DROPINS/cache.conf"
  else
    put_file unit "$DROPINS/cache.conf" 0644 <<EOF
# Written by install.sh: the model cache (NEMO_CACHE_DIR) is outside /var/cache/edge.
[Service]
ReadWritePaths=${probe[cache_dir]}
EOF
  fi
}

step_model() {
  local rc
  if ((!fetch_model || !nemo)); then
    say model "skipped ($( ((nemo)) && echo --no-model || echo --no-nemo))"
  elif [[ -n $D ]]; then
    say model "skipped (--destdir): run \`edge model fetch\` on the device"
  elif ((dry_run)); then
    say model "would fetch the model into ${probe[cache_dir]} when online"
  elif ! "$VENV/bin/edge" model fetch --help >/dev/null 2>&1; then
    warn model "this edge has no \`edge model fetch\`: the daemon downloads the model on first use"
  elif ! provision online "$MODEL_HOST" --timeout 5; then
    warn model "offline ($MODEL_HOST did not answer in 5 s): not prefetched;" \
      "run \`edge model fetch\` when online, or set NEMO_DIAR_MODEL_PATH"
  else
    say model "fetching into ${probe[cache_dir]}"
    # As the service user, so the cache stays the daemon's to write.
    rc=0
    runuser -u edge -- env HOME="$STATE_DIR" "$VENV/bin/edge" model fetch || rc=$?
    if ((rc)); then
      warn model "\`edge model fetch\` failed (exit $rc): not prefetched; run it again later"
    else
      say model "ready in ${probe[cache_dir]}"
      step_export
    fi
  fi
}

# The ONNX export (fp32, then int8) of the fetched model, so the worker can run without NeMo.
step_export() {
  local args rc
  if ! "$VENV/bin/edge" model export --help >/dev/null 2>&1; then
    warn model "this edge has no \`edge model export\`: the diarizer runs on NeMo"
    return 0
  fi
  for args in "" "--quantize int8"; do
    rc=0
    # shellcheck disable=SC2086  # $args: zero or two words
    runuser -u edge -- env HOME="$STATE_DIR" "$VENV/bin/edge" model export $args || rc=$?
    if ((rc)); then
      warn model "\`edge model export $args\` failed (exit $rc): the diarizer runs on NeMo; run it again later"
      return 0
    fi
  done
  say model "exported (fp32, int8) into ${probe[cache_dir]}/exported"
}

# --exported DIR: a folder `edge model export --out DIR` made on a build machine, checked
# against its marker, then copied into NEMO_CACHE_DIR/exported/<its name>/ (atomically; the
# same folder already there is "unchanged").
step_exported() {
  [[ -n $exported ]] || return 0
  local target=${probe[cache_dir]}/exported/${exported##*/} tmp
  "$PY" - "$exported" "$EXPORT_MARKER" <<'PYEOF' || die "--exported $exported: does not match its marker (see above)"
import hashlib, json, os, sys
folder, marker = sys.argv[1], sys.argv[2]
files = json.load(open(os.path.join(folder, marker)))["files"]
for name, want in files.items():
    path = os.path.join(folder, name)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    if os.path.getsize(path) != want["size"] or h.hexdigest() != want["sha256"]:
        sys.exit(f"{path}: size or SHA-256 differs from {marker}")
PYEOF
  if [[ -d $D$target ]] && diff -rq "$exported" "$D$target" >/dev/null 2>&1; then
    say model "unchanged $target"
  elif ((dry_run)); then
    say model "would install $exported as $target"
  else
    tmp=${D}${target%/*}/.tmp-${target##*/}-$$
    mkdir -p "${tmp%/*}"
    rm -rf "$tmp"
    cp -r "$exported" "$tmp"
    if live; then chown -R edge:edge "${D}${target%/*}" ; fi
    rm -rf "$D$target.old"
    [[ -d $D$target ]] && mv "$D$target" "$D$target.old"
    mv "$tmp" "$D$target"
    rm -rf "$D$target.old"
    say model "installed $exported as $target"
    changes=1
  fi
}

step_service() {
  if [[ -n $D ]]; then
    # What `systemctl enable` does, without systemctl: the unit starts at the image's boot.
    if [[ -L $D$WANTS_LINK ]]; then
      say service "unchanged (enabled)"
    elif ((dry_run)); then
      say service "would enable edge.service"
    else
      mkdir -p "$(dirname "$D$WANTS_LINK")"
      ln -s ../edge.service "$D$WANTS_LINK"
      say service "enabled (starts at boot)"
      changes=1
    fi
  elif ((!systemd_running && foreground)); then
    say service "systemd is not running: the daemon runs in this terminal (Ctrl-C stops it)"
  elif ((!systemd_running)); then
    say service "systemd is not running: start the daemon with --foreground, or with" \
      "runuser -u edge -- $VENV/bin/edge serve"
  elif ((dry_run)); then
    say service "would enable and (re)start edge.service"
  else
    ((foreground)) && say service "systemd runs the daemon; follow it with journalctl -u edge -f"
    ((changes)) && systemctl daemon-reload
    if ! systemctl is-enabled --quiet edge.service; then
      systemctl enable --quiet edge.service
      say service "enabled"
      changes=1
    fi
    if systemctl is-active --quiet edge.service && ((!changes)); then
      say service "unchanged (active)"
    else
      # Type=notify: this returns once the daemon said READY=1 (or the start failed).
      systemctl restart edge.service ||
        die "edge.service did not start: systemctl status edge; journalctl -u edge -b"
      say service "started (active)"
      changes=1
    fi
  fi
}

uninstall() {
  if ((systemd_running)) && [[ -e $UNIT ]]; then
    if ((dry_run)); then
      say service "would stop and disable edge.service"
    else
      systemctl disable --now --quiet edge.service || true
      say service "stopped and disabled"
    fi
  fi
  remove unit "$WANTS_LINK" "$DROPINS/memory.conf" "$DROPINS/cache.conf" "$UNIT"
  [[ -d $D$DROPINS ]] && ((!dry_run)) && rmdir --ignore-fail-on-non-empty "$D$DROPINS"
  remove code "$PREFIX" "$SYSUSERS"
  ((systemd_running && !dry_run)) && systemctl daemon-reload
  say kept "$ENV_FILE, the model cache, $STATE_DIR and the user edge"
}

# --- main ---

if ((!dry_run)) && [[ -z $D ]] && ((EUID != 0)); then
  die "run as root (sudo ./install.sh), or use --dry-run or --destdir DIR"
fi
if ((uninstall)); then
  uninstall
else
  step_packages
  check_python
  extras=""
  ((nemo)) && extras=diarization
  ((!nemo)) && [[ -n $exported ]] && extras=onnx  # the exported runtime alone (no torch, no NeMo)
  # sd_notify needs systemd-python where the unit will run: here, or an image with libsystemd.
  if ((systemd_running)) || pkg-config --exists libsystemd 2>/dev/null; then
    extras=${extras:+$extras,}systemd
  fi
  stamp=$(venv_stamp)
  venv_kind=$( ((nemo)) && echo nemo || echo base)
  [[ -x $D$VENV/bin/python && -f $D$STAMP && $(<"$D$STAMP") == "$stamp" ]] && venv_kind=none
  step_probe
  step_user
  check_python_for_edge
  ensure_dir dirs "${probe[cache_dir]}"
  ensure_dir dirs "$STATE_DIR"
  # pip unpacks GBs of wheels into TMPDIR: on the NVMe, not the SD card, where there is one;
  # in a root-only directory there (safe_tmp_parent), never inside the edge user's cache.
  if live && [[ ${probe[cache_kind]} == nvme && $venv_kind != none ]]; then
    tmp_parent=$(safe_tmp_parent "${probe[cache_dir]}")
    [[ $tmp_parent == / ]] && tmp_parent=${TMPDIR:-/tmp}
    TMPDIR=$(mktemp -d -p "$tmp_parent" .edge-install.XXXXXX)
    export TMPDIR
    trap 'rm -rf "$TMPDIR"' EXIT
    step_venv
    rm -rf "$TMPDIR" && unset TMPDIR && trap - EXIT
  else
    step_venv
  fi
  step_config
  step_unit
  step_exported
  step_model
  step_service
fi

summary="nothing changed"
((changes)) && summary=$( ((uninstall)) && echo uninstalled || echo installed)
((dry_run)) && summary="dry run, nothing written"
((warnings)) && summary+=" ($warnings warning(s) above)"
echo "done: $summary"
if live && ((!uninstall)); then
  "$VENV/bin/edge" check || true  # the operator's view of the result; it never fails the install
  if ((foreground && !systemd_running)); then
    exec runuser -u edge -- env HOME="$STATE_DIR" "$VENV/bin/edge" serve
  fi
fi
