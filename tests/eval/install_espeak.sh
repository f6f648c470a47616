#!/usr/bin/env bash
# Install espeak-ng from Debian (synthesised test songs of tests/test_per.py). Idempotent; needs root
# unless espeak-ng is already there.
set -euo pipefail
log() { echo "install_espeak: $*" >&2; }
command -v espeak-ng >/dev/null && exit 0
[[ $(id -u) -eq 0 ]] || { log "error: espeak-ng missing and not root (apt-get install -y espeak-ng)"; exit 1; }
export DEBIAN_FRONTEND=noninteractive
if ! compgen -G "/var/lib/apt/lists/*_Packages" >/dev/null; then
    log "apt-get update"
    apt-get update -qq >&2
fi
log "installing espeak-ng"
if ! apt-get install -y -qq --no-install-recommends espeak-ng >&2; then
    log "install failed; refreshing package lists and retrying"
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends espeak-ng >&2
fi
command -v espeak-ng >/dev/null
