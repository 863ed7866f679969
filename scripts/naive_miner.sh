#!/usr/bin/env bash
# naive_miner.sh: the baseline of `make bench` (scripts/bench.py), not a miner to run.
#
# What a first "it works" miner looks like: a bash loop around curl and jq that
# registers, long-polls for a job, acks it, runs it, hashes the artifacts and
# posts the multipart result. It speaks the wire protocol correctly (bearer
# token from register, Idempotency-Key on every POST, JSON content type,
# multipart result with a `metadata` part) but has none of the miner's
# properties: no durable state (a crash loses the job), no retries, no
# signature check, no sandbox, no heartbeats (run it with long leases), one
# job at a time, one curl process and one TCP connection per call.
#
# usage: naive_miner.sh BASE_URL [MAX_JOBS]      (MAX_JOBS 0 = forever)
# env:   MINER_AUTH (bootstrap token, default dev-bootstrap-token),
#        NAIVE_NODE_ID (default naive-1), NAIVE_WAIT_S (long poll, default 20),
#        NAIVE_WORKDIR (default a new temp dir), NAIVE_ALLOW (commands it runs, default "sh")
# needs: bash, curl, jq, sha256sum, stat.
set -u
URL=${1:?usage: naive_miner.sh BASE_URL [MAX_JOBS]}
MAX=${2:-0}
BOOT=${MINER_AUTH:-dev-bootstrap-token}
NODE=${NAIVE_NODE_ID:-naive-1}
WAIT=${NAIVE_WAIT_S:-20}
WORK=${NAIVE_WORKDIR:-$(mktemp -d)}
ALLOW=" ${NAIVE_ALLOW:-sh} "
JSON='Content-Type: application/json'

# Idempotency-Key: a fresh UUID per logical request (no retries, so never reused).
newkey() { read -r KEY </proc/sys/kernel/random/uuid; }

newkey
TOKEN=$(curl -sf -X POST "$URL/nodes/register" -H "Authorization: Bearer $BOOT" \
  -H "Idempotency-Key: $KEY" -H "$JSON" \
  -d "{\"node_id\":\"$NODE\",\"version\":\"naive\",\"runners\":[\"cli\"],\"slots\":{\"cpu\":1,\"gpu\":0}}" |
  jq -r .node_token) || { echo "naive: register failed" >&2; exit 1; }
AUTH="Authorization: Bearer $TOKEN"
PULL="{\"node_id\":\"$NODE\",\"filters\":{\"runners\":[\"cli\"],\"cpu_slots_free\":1,\"gpu_slots_free\":0},\"wait_s\":$WAIT}"

done_jobs=0
while [ "$MAX" -eq 0 ] || [ "$done_jobs" -lt "$MAX" ]; do
  newkey
  reply=$(curl -sf -X POST "$URL/jobs/pull" -H "$AUTH" -H "Idempotency-Key: $KEY" -H "$JSON" \
    -d "$PULL") || { sleep 1; continue; }
  # One jq call turns the reply into shell assignments (@sh quotes them safely).
  vars=$(jq -r 'if .job == null then "job_id=" else
    "job_id=\(.job.job_id|@sh) attempt=\(.job.attempt) lease=\(.lease.lease_id|@sh)"
    + " cmd=\(.job.command|@sh) args=(\((.job.args // [])|map(@sh)|join(" ")))"
    + " arts=(\((.job.artifacts // [])|map(.path|@sh)|join(" ")))" end' <<<"$reply")
  eval "$vars"
  [ -n "$job_id" ] || continue

  newkey
  curl -sf -o /dev/null -X POST "$URL/jobs/ack" -H "$AUTH" -H "Idempotency-Key: $KEY" -H "$JSON" \
    -d "{\"job_id\":\"$job_id\",\"node_id\":\"$NODE\",\"lease_id\":\"$lease\",\"attempt\":$attempt}" ||
    { echo "naive: ack of $job_id failed" >&2; continue; }

  dir="$WORK/$job_id"
  mkdir -p "$dir"
  if [[ "$ALLOW" == *" $cmd "* ]]; then
    (cd "$dir" && exec "$cmd" "${args[@]}") >"$dir/exec.log" 2>&1
    code=$?
  else
    code=126
  fi

  newkey
  if [ "$code" -ne 0 ]; then
    curl -sf -o /dev/null -X POST "$URL/jobs/fail" -H "$AUTH" -H "Idempotency-Key: $KEY" -H "$JSON" \
      -d "{\"job_id\":\"$job_id\",\"node_id\":\"$NODE\",\"attempt\":$attempt,\"error_code\":\"E_EXIT\",\"error_msg\":\"exit $code\",\"retryable\":false}" ||
      echo "naive: fail report of $job_id failed" >&2
  else
    meta="" parts=()
    for a in "${arts[@]}"; do
      read -r sha _ < <(sha256sum "$dir/$a")
      size=$(stat -c %s "$dir/$a")
      meta+="${meta:+,}{\"path\":\"$a\",\"size\":$size,\"sha256\":\"$sha\",\"upload_id\":null}"
      parts+=(-F "artifact=@$dir/$a;filename=$a")
    done
    printf '{"job_id":"%s","node_id":"%s","attempt":%s,"exit_code":0,"artifacts":[%s]}' \
      "$job_id" "$NODE" "$attempt" "$meta" >"$dir/metadata.json"
    curl -sf -o /dev/null -X POST "$URL/jobs/result" -H "$AUTH" -H "Idempotency-Key: $KEY" \
      -F "metadata=<$dir/metadata.json;type=application/json" "${parts[@]}" ||
      echo "naive: result of $job_id failed" >&2
  fi
  done_jobs=$((done_jobs + 1))
done
