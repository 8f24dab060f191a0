#!/usr/bin/env bash
# Checks that imports run one way between the folders of src/ (see
# ARCHITECTURE.md). Prints each use that breaks a rule, as FILE:LINE and
# the use; prints nothing and exits 0 when there is none.
#
#   folder    may use (besides the shared age, beneath, digest, error, ui)
#   wire      -
#   http      -
#   plan      wire
#   client    wire
#   courier   wire
#   server    http, wire
#   cmd       client, courier, plan, wire
#   lib.rs, cli.rs (the front): anything
set -euo pipefail
cd "$(dirname "$0")/../src"
status=0
check() {  # LAYER FILES... ; ALLOWED in $allowed
    local layer=$1
    shift
    local bad
    bad=$({ grep -nHoE 'crate::(wire|http|server|client|courier|plan|cmd)\b' "$@" || true; } |
        sed 's/crate::/ /' |
        awk -F'[: ]' -v self="$layer" -v ok="$allowed" '
            { split(ok, a, " ");
              allowed = ($4 == self); for (i in a) if (a[i] == $4) allowed = 1;
              if (!allowed) print "src/" $1 ":" $2 ": " self " uses " $4 }')
    if [ -n "$bad" ]; then
        echo "$bad"
        status=1
    fi
}
allowed="" check wire wire/*.rs
allowed="" check http http/*.rs
allowed="wire" check plan plan.rs
allowed="wire" check client client/*.rs
allowed="wire" check courier courier/*.rs
allowed="http wire" check server server/*.rs
allowed="client courier plan wire" check cmd cmd/*.rs
allowed="" check shared beneath.rs digest.rs error.rs ui.rs
exit $status
