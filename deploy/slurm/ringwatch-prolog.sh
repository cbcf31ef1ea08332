#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Slurm Prolog: start one `ringwatch agent` on this node for the job.
#
# slurm.conf (every compute node):
#   Prolog=/etc/slurm/ringwatch-prolog.sh
#   Epilog=/etc/slurm/ringwatch-epilog.sh
#   PrologFlags=Alloc          # run at allocation on every node of the job, before any step
# Settings: /etc/ringwatch/slurm.env (ringwatch-slurm.env documents each), or the file named
# by RINGWATCH_SLURM_CONF.
#
# The agent follows the ranks' logs in ROOT/<job id>/logs (the job's node-local folder, made
# here, owned by the job's user), labels the node's series with the job id (SLURM_JOB_ID),
# serves /metrics and pushes to `ringwatch serve` with the token read from a file (never on the
# command line). It runs in its own session: slurmd kills the prolog's process group when the
# prolog returns, and the agent must outlive it. Its pid goes to RUN_DIR/agent-<job id>.pid,
# from which the epilog stops it with SIGTERM.
#
# A failing prolog drains the node and requeues the job, so this script always exits 0:
# monitoring that cannot start says why (stderr and the agent's log) and lets the job run.

PATH=/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "ringwatch-prolog: job ${SLURM_JOB_ID:-?}: $*" >&2; }

main() {
    local conf=${RINGWATCH_SLURM_CONF:-/etc/ringwatch/slurm.env}
    if [[ -r $conf ]]; then
        # shellcheck source=ringwatch-slurm.env
        . "$conf" || say "cannot read $conf; using the defaults"
    fi
    local bin=${RINGWATCH_BIN:-/opt/ringwatch/bin/ringwatch}
    local root=${RINGWATCH_SLURM_ROOT:-/var/tmp/ringwatch}
    local run_dir=${RINGWATCH_SLURM_RUN_DIR:-/run/ringwatch}
    local listen=${RINGWATCH_SLURM_PROMETHEUS:-0.0.0.0:9400}
    local endpoint=${RINGWATCH_SLURM_OTLP_ENDPOINT:-}
    local token_file=${RINGWATCH_SLURM_TOKEN_FILE-/etc/ringwatch/token}
    local agent_user=${RINGWATCH_SLURM_AGENT_USER:-}
    local timeout_s=${RINGWATCH_SLURM_START_TIMEOUT_S:-30}
    local job=${SLURM_JOB_ID:-}

    if [[ ! $job =~ ^[0-9]+$ ]]; then
        say "SLURM_JOB_ID is not a job id; no agent"
        return 0
    fi
    if [[ ! -x $bin ]]; then
        say "$bin is not executable (RINGWATCH_BIN); no agent"
        return 0
    fi
    local job_dir=$root/$job
    local pid_file=$run_dir/agent-$job.pid
    local out_file=$run_dir/agent-$job.log

    if ! mkdir -p "$run_dir" "$job_dir/logs"; then
        say "cannot make $run_dir or $job_dir/logs; no agent"
        return 0
    fi
    # The ranks run as the job's user and write the logs; the agent only reads them.
    if [[ $(id -u) == 0 && -n ${SLURM_JOB_UID:-} ]]; then
        local gid=${SLURM_JOB_GID:-$(id -g "${SLURM_JOB_USER:-$SLURM_JOB_UID}" 2>/dev/null)}
        chown "$SLURM_JOB_UID${gid:+:$gid}" "$job_dir" "$job_dir/logs" ||
            say "cannot give $job_dir to uid $SLURM_JOB_UID"
        chmod 0755 "$job_dir" "$job_dir/logs"
    fi

    if [[ -s $pid_file ]]; then
        local old
        old=$(<"$pid_file")
        if [[ $old =~ ^[0-9]+$ ]] && kill -0 "$old" 2>/dev/null; then
            say "agent already running (pid $old)"
            return 0
        fi
    fi

    local args=(agent --log-dir "$job_dir/logs" --job-id "$job" --prometheus "$listen")
    [[ -n $endpoint ]] && args+=(--otlp-endpoint "$endpoint")
    if [[ -n $token_file ]]; then
        if [[ -r $token_file ]]; then
            args+=(--token-file "$token_file")
        else
            say "cannot read the token file $token_file: pushes go without a token"
        fi
    fi
    local extra=()
    read -r -a extra <<< "${RINGWATCH_SLURM_AGENT_ARGS:-}"
    args+=("${extra[@]}")

    # setsid: a session and process group of its own (slurmd kills the prolog's group when
    # the prolog returns); setpriv: the agent's user. Both exec, so $! is the agent's pid.
    local as=()
    if [[ -n $agent_user && $(id -u) == 0 ]]; then
        as=(setpriv --reuid="$agent_user" --regid="$(id -g "$agent_user")" --init-groups --)
    fi
    setsid "${as[@]}" "$bin" "${args[@]}" </dev/null >"$out_file" 2>&1 &
    local pid=$!
    echo "$pid" > "$pid_file.tmp" && mv -f "$pid_file.tmp" "$pid_file"

    # Wait for the agent's start line (its /metrics is then listening) or its end.
    local waited=0
    while (( waited < timeout_s * 5 )); do
        if ! kill -0 "$pid" 2>/dev/null; then
            say "the agent exited at start; its last words:"
            tail -n 5 "$out_file" >&2
            rm -f "$pid_file"
            return 0
        fi
        if grep -q '^ringwatch agent: .*GPU(s)' "$out_file" 2>/dev/null; then
            say "agent started (pid $pid, logs $job_dir/logs, output $out_file)"
            return 0
        fi
        sleep 0.2
        waited=$((waited + 1))
    done
    say "agent (pid $pid) not confirmed after ${timeout_s} s; left running, see $out_file"
    return 0
}

main "$@"
exit 0
