//! `iotdr verify` against moto: a synced fleet verifies equal, drift made by
//! hand in the target is found with the right kinds, and a routed and
//! filtered pipeline compares each region with its share of the source.

mod common;

use common::fleet::seed;
use common::moto::Moto;
use common::region_state::{assert_same, region_state, without_shadow_versions};
use common::runner::{Run, iotdr};
use serde_json::{Value, json};

const SOURCE: &str = "us-east-1";
const TARGET: &str = "eu-west-1";

fn sync(moto: &Moto, test: &Run) {
    let out = iotdr(moto, test.dir.path(), &["sync", test.pipeline.to_str().unwrap()]);
    assert!(out.status.success(), "iotdr sync failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// `iotdr verify --json`: its exit code and report.
fn verify(moto: &Moto, test: &Run) -> (i32, Value) {
    let out = iotdr(moto, test.dir.path(), &["verify", test.pipeline.to_str().unwrap(), "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("no JSON report ({e}):\n{stderr}"));
    (out.status.code().expect("an exit code"), report)
}

/// The names a report lists for `kind` as `what` (missing, extra) in `region`.
fn names(report: &Value, region: usize, kind: &str, what: &str) -> Vec<String> {
    let listed = report["regions"][region]["kinds"][kind][what].as_array().unwrap();
    listed.iter().map(|v| v.as_str().map_or_else(|| v["name"].as_str().unwrap().to_string(), str::to_string)).collect()
}

#[tokio::test]
async fn a_synced_fleet_verifies_equal_and_drift_made_by_hand_is_found_by_kind() {
    let moto = Moto::start();
    let fleet = seed(&moto, SOURCE, 40).await;
    let test = Run::new(SOURCE, &moto.url, TARGET, &moto.url, &[], "");
    sync(&moto, &test);
    let (code, report) = verify(&moto, &test);
    assert_eq!((code, &report["equal"]), (0, &json!(true)), "{report:#}");
    let things = &report["regions"][0]["kinds"]["things"];
    assert_eq!(things["equal"], fleet.things, "{report:#}");
    assert!(report["regions"][0]["kinds"]["shadows"]["equal"].as_u64().unwrap() > 0);
    assert!(report["regions"][0]["kinds"]["certificates"]["equal"].as_u64().unwrap() > 0);

    // Drift, made by hand in the target.
    let iot = moto.iot(TARGET).await;
    let attributes = aws_sdk_iot::types::AttributePayload::builder().attributes("site", "nowhere").merge(true).build();
    iot.update_thing().thing_name("dev-0001").attribute_payload(attributes).send().await.unwrap();
    let groups = iot.list_thing_groups_for_thing().thing_name("dev-0002").send().await.unwrap();
    let group = groups.thing_groups.unwrap()[0].group_name.clone().unwrap();
    iot.remove_thing_from_thing_group().thing_name("dev-0002").thing_group_name(&group).send().await.unwrap();
    // dev-0000 has a certificate and a classic shadow (see the fleet).
    let principals = iot.list_thing_principals().thing_name("dev-0000").send().await.unwrap().principals.unwrap();
    let certificate = principals[0].rsplit_once(":cert/").unwrap().1.to_string();
    iot.update_certificate()
        .certificate_id(&certificate)
        .new_status(aws_sdk_iot::types::CertificateStatus::Inactive)
        .send()
        .await
        .unwrap();
    let data = moto.data(TARGET).await;
    let state = json!({ "state": { "desired": { "mode": "boost", "extra": 1 } } }).to_string();
    data.update_thing_shadow()
        .thing_name("dev-0000")
        .payload(aws_sdk_iotdataplane::primitives::Blob::new(state))
        .send()
        .await
        .unwrap();
    iot.create_thing().thing_name("stray").send().await.unwrap();

    let (code, report) = verify(&moto, &test);
    assert_eq!((code, &report["equal"]), (1, &json!(false)), "{report:#}");
    let kinds = &report["regions"][0]["kinds"];
    let different = |kind: &str| -> Vec<(String, String)> {
        kinds[kind]["different"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| (d["name"].as_str().unwrap().to_string(), d["field"].as_str().unwrap().to_string()))
            .collect()
    };
    assert_eq!(
        different("things"),
        [("dev-0001".to_string(), "attributes.site".to_string()), ("dev-0002".into(), "groups".into())],
        "{report:#}"
    );
    assert_eq!(different("certificates"), [(certificate, "status".to_string())], "{report:#}");
    assert_eq!(different("shadows"), [("dev-0000 (classic)".to_string(), "state.desired.extra".to_string())]);
    assert_eq!(names(&report, 0, "things", "extra"), ["stray"]);
    assert_eq!(kinds["things"]["equal"], fleet.things - 2);
    for kind in ["thing-types", "thing-groups", "billing-groups", "policies"] {
        assert_eq!(kinds[kind]["different"], json!([]), "{kind}: {report:#}");
        assert_eq!(kinds[kind]["missing"], json!([]), "{kind}: {report:#}");
    }

    // The table names them too.
    let out = iotdr(&moto, test.dir.path(), &["verify", test.pipeline.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(table.contains("different  things dev-0001 attributes.site: source \""), "{table}");
    assert!(table.contains("extra      things stray"), "{table}");
    assert!(table.contains("eu-west-1: 5 entities drifted"), "{table}");

    // Repaired: the drift goes to the target as events, and it verifies equal.
    let out = iotdr(&moto, test.dir.path(), &["verify", test.pipeline.to_str().unwrap(), "--json", "--repair"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!((out.status.code(), &report["equal"]), (Some(0), &json!(true)), "{report:#}\n{stderr}");
    assert_eq!(report["repair"]["sent"]["summary"]["dead_letters"], 0, "{report:#}");
    assert_eq!(report["repair"]["before"][0]["kinds"]["things"]["extra"], json!(["stray"]));
    assert_same(
        &without_shadow_versions(region_state(&moto, SOURCE).await),
        &without_shadow_versions(region_state(&moto, TARGET).await),
    );
    let (code, _) = verify(&moto, &test);
    assert_eq!(code, 0);
}

#[tokio::test]
async fn a_routed_and_filtered_pipeline_verifies_each_region_against_its_share() {
    let moto = Moto::start();
    let fleet = seed(&moto, SOURCE, 24).await;
    let stages = [
        common::runner::stage(
            "skip-berlin",
            &common::plugin("attribute-filter"),
            r#"{ attribute = "site", drop_values = ["berlin"] }"#,
            "dead-letter",
        ),
        common::runner::stage(
            "per-customer",
            &common::plugin("region-router"),
            r#"{ by_attribute = "customer", routes = { acme = ["eu-west-1"], globex = ["eu-central-1"] } }"#,
            "dead-letter",
        ),
    ];
    let test = Run::new(SOURCE, &moto.url, TARGET, &moto.url, &[], &stages.concat());
    let text = std::fs::read_to_string(&test.pipeline).unwrap();
    let text = text.replace(
        r#"targets = ["eu-west-1"]"#,
        &format!(
            "targets = [\"eu-west-1\", \"eu-central-1\"]\n\n[regions.eu-central-1]\nendpoint_url = \"{}\"",
            moto.url
        ),
    );
    std::fs::write(&test.pipeline, text).unwrap();
    sync(&moto, &test);

    let (code, report) = verify(&moto, &test);
    assert_eq!((code, &report["equal"]), (0, &json!(true)), "{report:#}");
    // Each region holds its customer's things, berlin's left out, and is not
    // reported missing the others.
    let equal = |region: usize| report["regions"][region]["kinds"]["things"]["equal"].as_u64().unwrap() as usize;
    let (acme, globex) = (0..fleet.things)
        .filter(|i| i % 4 != 0)
        .fold((0, 0), |(a, g), i| if i % 3 == 0 { (a + 1, g) } else { (a, g + 1) });
    assert_eq!((equal(0), equal(1)), (acme, globex), "{report:#}");

    // A thing of globex's copied into acme's region by hand is extra there.
    let iot = moto.iot(TARGET).await;
    iot.create_thing().thing_name("dev-0001").send().await.unwrap();
    let (code, report) = verify(&moto, &test);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(names(&report, 0, "things", "extra"), ["dev-0001"]);
    assert_eq!(report["regions"][1]["kinds"]["things"]["extra"], json!([]));
}

/// `[reconcile] every`: a run that follows its source catches what AWS
/// publishes no event for (a certificate deactivated, a new policy version)
/// and what was changed in the target behind its back (an attribute, a
/// shadow), and leaves a target's extra thing alone.
#[tokio::test]
async fn a_following_run_reconciles_what_no_event_says() {
    let moto = Moto::start();
    let fleet = seed(&moto, SOURCE, 12).await;
    let test = Run::new(SOURCE, &moto.url, TARGET, &moto.url, &fleet.events, "");
    let text = std::fs::read_to_string(&test.pipeline).unwrap();
    std::fs::write(&test.pipeline, format!("{text}\n[reconcile]\nevery = \"1s\"\n")).unwrap();
    let log = std::fs::File::create(test.dir.path().join("run.log")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_iotdr"))
        .args(["run", test.pipeline.to_str().unwrap()])
        .current_dir(test.dir.path())
        .env("IOTDR_CACHE_DIR", common::cache_dir())
        .env("IOTDR_LOG", common::log_filter())
        .envs(moto.env())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while region_state(&moto, TARGET).await["things"].as_object().unwrap().len() < fleet.things {
        assert!(std::time::Instant::now() < deadline, "the fleet never arrived: {}", test.log());
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // No event says any of this.
    let iot = moto.iot(SOURCE).await;
    let principals = iot.list_thing_principals().thing_name("dev-0000").send().await.unwrap().principals.unwrap();
    let certificate = principals[0].rsplit_once(":cert/").unwrap().1.to_string();
    iot.update_certificate()
        .certificate_id(&certificate)
        .new_status(aws_sdk_iot::types::CertificateStatus::Revoked)
        .send()
        .await
        .unwrap();
    let document = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Deny","Action":"iot:*","Resource":"*"}]}"#;
    iot.create_policy_version()
        .policy_name("device-policy")
        .policy_document(document)
        .set_as_default(true)
        .send()
        .await
        .unwrap();
    let target = moto.iot(TARGET).await;
    let attributes = aws_sdk_iot::types::AttributePayload::builder().attributes("site", "nowhere").merge(true).build();
    target.update_thing().thing_name("dev-0003").attribute_payload(attributes).send().await.unwrap();
    let state = json!({ "state": { "reported": { "temperature": 99, "hacked": true } } }).to_string();
    let data = moto.data(TARGET).await;
    let payload = aws_sdk_iotdataplane::primitives::Blob::new(state);
    data.update_thing_shadow().thing_name("dev-0002").payload(payload).send().await.unwrap();
    target.create_thing().thing_name("stray").send().await.unwrap();

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let source = without_shadow_versions(region_state(&moto, SOURCE).await);
        let mut target = without_shadow_versions(region_state(&moto, TARGET).await);
        let stray = target["things"].as_object_mut().unwrap().remove("stray");
        if source == target {
            assert!(stray.is_some(), "a live run deletes nothing the source did not delete");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the drift was never reconciled: {}", test.log());
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let target = region_state(&moto, TARGET).await;
    assert_eq!(target["certificates"][&certificate]["status"], "REVOKED");
    assert_eq!(target["things"]["dev-0002"]["shadows"]["classic"]["state"]["reported"].get("hacked"), None);
    assert!(test.log().contains("left alone"), "the extra thing is reported: {}", test.log());
}
