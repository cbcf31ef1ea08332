#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# Slurm Epilog: stop the job's `ringwatch agent` on this node (started by ringwatch-prolog.sh).
#
# Reads the pid from RUN_DIR/agent-<job id>.pid, checks that the process is that job's agent
# (a pid can be reused), sends SIGTERM (the agent pushes once more and exits), waits up to
# RINGWATCH_SLURM_STOP_TIMEOUT_S, then SIGKILL. Removes the pid file and, unless
# RINGWATCH_SLURM_KEEP_LOCAL=1, the agent's output (its warnings, if any, go to stderr first)
# and the job's node-local folder. Settings as for the prolog.
#
# A failing epilog drains the node, so this script always exits 0.

PATH=/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "ringwatch-epilog: job ${SLURM_JOB_ID:-?}: $*" >&2; }

# Running, not a zombie waiting for its parent.
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    stat=${stat##*) }
    [[ ${stat:0:1} != Z && ${stat:0:1} != X ]]
}

# The process is `ringwatch agent ... --job-id <job> ...`.
is_agent_of() {
    local cmdline
    cmdline=$(tr '\0' '\n' < "/proc/$1/cmdline" 2>/dev/null) || return 1
    grep -qx 'agent' <<< "$cmdline" && grep -qx -- "--job-id" <<< "$cmdline" &&
        grep -A1 -x -- "--job-id" <<< "$cmdline" | tail -n 1 | grep -qx -- "$2"
}

main() {
    local conf=${RINGWATCH_SLURM_CONF:-/etc/ringwatch/slurm.env}
    if [[ -r $conf ]]; then
        # shellcheck source=ringwatch-slurm.env
        . "$conf" || say "cannot read $conf; using the defaults"
    fi
    local root=${RINGWATCH_SLURM_ROOT:-/var/tmp/ringwatch}
    local run_dir=${RINGWATCH_SLURM_RUN_DIR:-/run/ringwatch}
    local timeout_s=${RINGWATCH_SLURM_STOP_TIMEOUT_S:-20}
    local job=${SLURM_JOB_ID:-}

    if [[ ! $job =~ ^[0-9]+$ ]]; then
        say "SLURM_JOB_ID is not a job id; nothing to stop"
        return 0
    fi
    local pid_file=$run_dir/agent-$job.pid
    if [[ -s $pid_file ]]; then
        local pid
        pid=$(<"$pid_file")
        if [[ ! $pid =~ ^[0-9]+$ ]]; then
            say "$pid_file holds no pid"
        elif ! alive "$pid"; then
            say "agent (pid $pid) already gone"
        elif ! is_agent_of "$pid" "$job"; then
            say "pid $pid is not this job's agent; left alone"
        else
            kill -TERM "$pid" 2>/dev/null
            local waited=0
            while alive "$pid" && (( waited < timeout_s * 5 )); do
                sleep 0.2
                waited=$((waited + 1))
            done
            if alive "$pid"; then
                kill -KILL "$pid" 2>/dev/null
                say "agent (pid $pid) did not stop within ${timeout_s} s of SIGTERM: killed"
            else
                say "agent (pid $pid) stopped on SIGTERM"
            fi
        fi
        rm -f "$pid_file"
    fi
    local out_file=$run_dir/agent-$job.log
    if [[ ${RINGWATCH_SLURM_KEEP_LOCAL:-0} != 1 ]]; then
        # What the agent said besides its start line (warnings: a push refused, ...).
        if [[ -f $out_file ]] && grep -vq '^ringwatch agent: .*GPU(s)' "$out_file"; then
            say "the agent's output:"
            tail -n 20 "$out_file" >&2
        fi
        rm -f "$out_file"
        if [[ -d $root/$job ]]; then
            rm -rf --one-file-system -- "${root:?}/$job"
        fi
    fi
    return 0
}

main "$@"
exit 0
