#!/usr/bin/env bash
# The demo, end to end on this machine: builds iotdr and the plug-ins,
# installs and starts the moto AWS emulator, seeds a small fleet into
# us-east-1, replicates it to eu-west-1 and eu-central-1 through
# pipelines/replicate.toml (all four plug-ins), prints a summary and what each
# region holds, and stops what it started.
#
#   scripts/demo.sh             the real replication on the emulator
#   scripts/demo.sh --dry-run   no AWS at all: the calls pipelines/demo.toml would make for examples/events
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
"$ROOT/scripts/build-plugins.sh"
say "building iotdr"
cargo build --quiet -p iotdr
IOTDR="$CARGO_TARGET_DIR/debug/iotdr"

if [[ ${1:-} == --dry-run ]]; then
    say "iotdr run pipelines/demo.toml --dry-run --until-idle"
    exec "$IOTDR" run pipelines/demo.toml --dry-run --until-idle
fi

WORK=$(mktemp -d)
MOTO=$(bash "$ROOT/scripts/moto.sh" start)
trap 'bash "$ROOT/scripts/moto.sh" stop "${MOTO##*:}"; rm -rf "$WORK"' EXIT
PY="$ROOT/.venv/bin/python"

say "seeding a fleet into us-east-1 (moto at $MOTO)"
"$PY" examples/seed_fleet.py --endpoint "$MOTO" --region us-east-1 --things 24 --events "$WORK/events.jsonl"
echo "$(wc -l <"$WORK/events.jsonl") events written, as AWS IoT publishes them" >&2

say "iotdr run pipelines/replicate.toml --until-idle"
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_EC2_METADATA_DISABLED=true
IOTDR_ENDPOINT="$MOTO" IOTDR_EVENTS="$WORK/events.jsonl" IOTDR_STATE="$WORK/state" \
    "$IOTDR" run pipelines/replicate.toml --until-idle 2>"$WORK/run.log" || { cat "$WORK/run.log" >&2; exit 1; }

say "summary"
"$PY" - "$WORK/run.log" "$MOTO" <<'PY'
import json, sys
import boto3
log, endpoint = sys.argv[1], sys.argv[2]
summary = next(json.loads(l[len("summary: "):]) for l in open(log) if l.startswith("summary: "))
run, requests = summary["run"], summary["requests"]
print(f"records read       {run['records']}")
for entity, count in sorted(run["applied"].items()):
    print(f"applied            {count:4d} {entity}")
print(f"dropped by stages  {run['dropped']}")
print(f"dead letters       {run['dead_letters']}")
print(f"target API calls   {requests['calls']} ({requests['requests']} requests)")
print(f"calls per change   {summary['calls_per_change']:.2f}")
print()
session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing")
print(f"{'region':14} {'things':>6} {'groups':>6} {'certificates':>12} {'policies':>8}")
for region in ["us-east-1", "eu-west-1", "eu-central-1"]:
    iot = session.client("iot", region_name=region, endpoint_url=endpoint)
    things = len(iot.list_things(maxResults=250)["things"])
    groups = len(iot.list_thing_groups()["thingGroups"])
    certificates = len(iot.list_certificates()["certificates"])
    policies = len(iot.list_policies()["policies"])
    print(f"{region:14} {things:6d} {groups:6d} {certificates:12d} {policies:8d}")
table = session.client("dynamodb", region_name="eu-west-1", endpoint_url=endpoint)
items = table.scan(TableName="iotdr-global-registry")["Items"]
print(f"\nglobal registry (DynamoDB, eu-west-1): {len(items)} things")
PY

say "iotdr verify pipelines/replicate.toml (each target against the source through the stages)"
IOTDR_ENDPOINT="$MOTO" IOTDR_EVENTS="$WORK/events.jsonl" IOTDR_STATE="$WORK/state" \
    "$IOTDR" verify pipelines/replicate.toml
