#!/usr/bin/env bash
# A curl-only external agent for `areal-agents serve --train`: one-digit additions, one
# session per episode (open with the admin key -> chat with the session key -> reward -> end),
# the reward computed here. Needs curl and jq. Usage:
#   ADMIN=... examples/proxy/curl_agent.sh [URL] [EPISODES] [GROUP_SIZE]
# It prints one line per episode: task id, reward, reply. It stops when the server is gone.
set -euo pipefail
URL=${1:-http://127.0.0.1:8000}
EPISODES=${2:-8}
GROUP=${3:-4}
: "${ADMIN:?set ADMIN to the admin key of the gateway}"
POLICY=${POLICY:-solver}

for ((i = 0; i < EPISODES; i++)); do
  task=$((i / GROUP)); a=$((task % 10)); b=$((task * 7 % 10))
  opened=$(curl -sf "$URL/rl/sessions" -H "Authorization: Bearer $ADMIN" \
    -d "{\"policy\": \"$POLICY\", \"task_id\": \"curl-$task\", \"role\": \"solver\"}") || {
    echo "no session (server gone or no capacity for too long)"; exit 0; }
  sid=$(jq -r .session_id <<<"$opened"); key=$(jq -r .api_key <<<"$opened")
  reply=$(curl -sf "$URL/v1/chat/completions" -H "Authorization: Bearer $key" -d "{
      \"model\": \"$POLICY\", \"max_tokens\": 4, \"temperature\": 1.0,
      \"messages\": [{\"role\": \"user\", \"content\": \"$a + $b =\"}]}" |
    jq -r '.choices[0].message.content // ""')
  if [[ "$(tr -d '[:space:]' <<<"$reply")" == "$((a + b))" ]]; then reward=1.0; else reward=0.0; fi
  curl -sf "$URL/rl/sessions/$sid/reward" -H "Authorization: Bearer $key" \
    -d "{\"reward\": $reward}" >/dev/null
  curl -sf -X POST "$URL/rl/sessions/$sid/end" -H "Authorization: Bearer $key" >/dev/null
  printf '%s\t%s\t%q\n' "curl-$task" "$reward" "$reply"
done
