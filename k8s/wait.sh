#!/usr/bin/env bash
# Wait for a qwen3-sft Job to finish and exit with its trainer's exit code, so a caller (make submit, CI) fails
# the way the job did: 0 success, 2 user error, 3 transient, 4 quality gate refused, 1 anything else
# (internal error, deadline exceeded, timed out waiting).
#   k8s/wait.sh JOB_NAME [TIMEOUT]        TIMEOUT as for kubectl wait, default 24h; kubectl's current namespace
set -euo pipefail

job="${1:?usage: k8s/wait.sh JOB_NAME [TIMEOUT]}"
timeout="${2:-24h}"
poll_s="${WAIT_POLL_S:-10}"

# Conditions that are True, e.g. "SuccessCriteriaMet Complete" or "FailureTarget Failed".
job_state() {
  kubectl get job "$job" -o jsonpath='{.status.conditions[?(@.status=="True")].type}'
}

# Exit code of the trainer container in the newest pod that has one (earlier pods are retries).
last_exit_code() {
  kubectl get pods -l "batch.kubernetes.io/job-name=$job" --sort-by=.metadata.creationTimestamp \
    -o jsonpath='{range .items[*]}{.status.containerStatuses[?(@.name=="trainer")].state.terminated.exitCode}{"\n"}{end}' \
    | grep -E '^[0-9]+$' | tail -n 1
}

# kubectl wait takes one condition; a Job ends with either, so wait for both and stop at the first that returns.
kubectl wait --for=condition=complete --timeout="$timeout" "job/$job" >/dev/null 2>&1 &
complete_pid=$!
kubectl wait --for=condition=failed --timeout="$timeout" "job/$job" >/dev/null 2>&1 &
failed_pid=$!
while kill -0 "$complete_pid" 2>/dev/null && kill -0 "$failed_pid" 2>/dev/null; do
  sleep "$poll_s"
done
kill "$complete_pid" "$failed_pid" 2>/dev/null || true
wait 2>/dev/null || true

state="$(job_state)"
case " $state " in
  *" Complete "*)
    echo "job/$job: complete"
    exit 0
    ;;
  *" Failed "*)
    reason="$(kubectl get job "$job" -o jsonpath='{.status.conditions[?(@.type=="Failed")].reason}')"
    code="$(last_exit_code || true)"
    case "$code" in
      2) meaning="user error (config, data, credentials): fix the input" ;;
      3) meaning="transient external error that outlived the retries" ;;
      4) meaning="the quality gate refused the push; artifacts are kept" ;;
      *) meaning="see kubectl logs job/$job" ;;
    esac
    echo "job/$job: failed ($reason), trainer exit code ${code:-none}: $meaning" >&2
    if [[ "$code" =~ ^[0-9]+$ && "$code" != 0 ]]; then
      exit "$code"
    fi
    exit 1
    ;;
  *)
    echo "job/$job: not finished after $timeout (conditions: ${state:-none}); it keeps running" >&2
    exit 1
    ;;
esac
