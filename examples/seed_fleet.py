#!/usr/bin/env python3
"""Seeds a small fleet into a source region (for the demo, on the moto
emulator) and writes the events AWS IoT would have published for it.

  seed_fleet.py --endpoint http://127.0.0.1:5000 --region us-east-1 \
                --things 24 --events /tmp/fleet.jsonl

Thing types, a two-level group hierarchy, things of two customers (and a few
test benches the demo pipeline filters out), a device policy and certificates
attached to some things, shadows. Uses boto3 (installed with moto).
"""
import argparse
import json

import boto3

ACCOUNT = "123456789012"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--things", type=int, default=24)
    parser.add_argument("--events", required=True)
    args = parser.parse_args()
    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                    region_name=args.region)
    iot = session.client("iot", endpoint_url=args.endpoint)
    data = session.client("iot-data", endpoint_url=args.endpoint)
    region = args.region
    events = []
    clock = [1764000000000]

    def at():
        clock[0] += 1
        return clock[0]

    def emit(topic, payload):
        events.append(json.dumps({"topic": topic, "payload": payload}))

    iot.create_thing_type(thingTypeName="chiller-v3", thingTypeProperties={
        "thingTypeDescription": "Third generation chiller", "searchableAttributes": ["customer", "site"]})
    emit("$aws/events/thingType/chiller-v3/created", {
        "eventType": "THING_TYPE_EVENT", "eventId": "type-1", "timestamp": at(), "operation": "CREATED",
        "accountId": ACCOUNT, "thingTypeName": "chiller-v3", "isDeprecated": False,
        "searchableAttributes": ["customer", "site"], "description": "Third generation chiller"})

    groups = [("emea", None), ("lyon-plant", "emea"), ("berlin-plant", "emea")]
    for group, parent in groups:
        kwargs = {"parentGroupName": parent} if parent else {}
        iot.create_thing_group(thingGroupName=group, thingGroupProperties={
            "thingGroupDescription": f"{group} sites", "attributePayload": {"attributes": {"tier": "gold"}}},
            **kwargs)
        emit(f"$aws/events/thingGroup/{group}/created", {
            "eventType": "THING_GROUP_EVENT", "eventId": f"group-{group}", "timestamp": at(),
            "operation": "CREATED", "accountId": ACCOUNT, "thingGroupName": group, "versionNumber": 1,
            "parentGroupName": parent, "description": f"{group} sites", "attributes": {"tier": "gold"}})
        if parent:
            emit(f"$aws/events/thingGroupHierarchy/thingGroup/{parent}/childThingGroup/{group}/added", {
                "eventType": "THING_GROUP_HIERARCHY_EVENT", "eventId": f"hierarchy-{group}", "timestamp": at(),
                "operation": "ADDED", "accountId": ACCOUNT, "thingGroupName": parent, "childGroupName": group})

    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect",
         "Resource": f"arn:aws:iot:{region}:{ACCOUNT}:client/${{iot:Connection.Thing.ThingName}}"},
        {"Effect": "Allow", "Action": "iot:Publish", "Resource": f"arn:aws:iot:{region}:{ACCOUNT}:topic/chillers/*"}]}
    iot.create_policy(policyName="chiller-policy", policyDocument=json.dumps(policy))

    for i in range(args.things):
        name = f"chiller-{i:04d}"
        bench = i % 8 == 7
        customer = "acme" if i % 2 == 0 else "globex"
        site = "lyon-plant" if i % 3 else "berlin-plant"
        attributes = {"customer": customer, "site": site, "env": "test" if bench else "prod", "fw": "7.1"}
        iot.create_thing(thingName=name, thingTypeName="chiller-v3", attributePayload={"attributes": attributes})
        emit(f"$aws/events/thing/{name}/created", {
            "eventType": "THING_EVENT", "eventId": f"{name}-created", "timestamp": at(), "operation": "CREATED",
            "accountId": ACCOUNT, "thingName": name, "versionNumber": 1, "thingTypeName": "chiller-v3",
            "attributes": attributes})
        iot.add_thing_to_thing_group(thingGroupName=site, thingName=name)
        emit(f"$aws/events/thingGroupMembership/thingGroup/{site}/thing/{name}/added", {
            "eventType": "THING_GROUP_MEMBERSHIP_EVENT", "eventId": f"{name}-member", "timestamp": at(),
            "operation": "ADDED", "accountId": ACCOUNT,
            "thingArn": f"arn:aws:iot:{region}:{ACCOUNT}:thing/{name}",
            "groupArn": f"arn:aws:iot:{region}:{ACCOUNT}:thinggroup/{site}"})
        if i % 3 == 0:
            cert = iot.create_keys_and_certificate(setAsActive=True)
            iot.attach_policy(policyName="chiller-policy", target=cert["certificateArn"])
            iot.attach_thing_principal(thingName=name, principal=cert["certificateArn"])
        state = {"reported": {"compressor": "on", "supplyTempC": 6 + i % 4}}
        reply = data.update_thing_shadow(thingName=name, payload=json.dumps({"state": state}).encode())
        version = json.loads(reply["payload"].read())["version"]
        emit(f"$aws/things/{name}/shadow/update/accepted",
             {"state": state, "version": version, "timestamp": at() // 1000})

    with open(args.events, "w") as out:
        out.write("\n".join(events) + "\n")


if __name__ == "__main__":
    main()
