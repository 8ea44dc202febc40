//! `iotdr sync` against moto: an existing fleet, never seen as events, copied
//! into an empty region through the pipeline and compared field by field.

mod common;

use common::fleet::seed;
use common::moto::Moto;
use common::region_state::{assert_same, region_state, without_shadow_versions};
use common::runner::{Run, iotdr};
use serde_json::Value;

const SOURCE: &str = "us-east-1";
const TARGET: &str = "eu-west-1";

fn sync(moto: &Moto, test: &Run, args: &[&str]) -> Value {
    let mut all = vec!["sync", test.pipeline.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = iotdr(moto, test.dir.path(), &all);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "iotdr sync failed:\n{stderr}");
    let line = stderr.lines().find(|l| l.starts_with("summary: ")).unwrap_or_else(|| panic!("no summary:\n{stderr}"));
    serde_json::from_str(line.trim_start_matches("summary: ")).unwrap()
}

/// `iotdr <command> <pipeline>` in the background, its output discarded.
fn spawn(moto: &Moto, test: &Run, command: &str) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_iotdr"))
        .args([command, test.pipeline.to_str().unwrap()])
        .current_dir(test.dir.path())
        .env("IOTDR_CACHE_DIR", common::cache_dir())
        .envs(moto.env())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn an_existing_fleet_is_synced_into_an_empty_region_field_by_field() {
    let moto = Moto::start();
    let fleet = seed(&moto, SOURCE, 120).await;
    // What the generated fleet lacks: a billing group with members, a deprecated type.
    let iot = moto.iot(SOURCE).await;
    let properties = aws_sdk_iot::types::BillingGroupProperties::builder().billing_group_description("premium").build();
    iot.create_billing_group().billing_group_name("premium").billing_group_properties(properties).send().await.unwrap();
    for thing in ["dev-0001", "dev-0002"] {
        iot.add_thing_to_billing_group().billing_group_name("premium").thing_name(thing).send().await.unwrap();
    }
    iot.create_thing_type().thing_type_name("retired").send().await.unwrap();
    iot.deprecate_thing_type().thing_type_name("retired").send().await.unwrap();
    // The pipeline's own source (a file) is not what a sync reads.
    let test = Run::new(SOURCE, &moto.url, TARGET, &moto.url, &[], "");
    let summary = sync(&moto, &test, &[]);
    assert_eq!(summary["run"]["dead_letters"], 0, "{summary} {:?}", test.dead_letters(&moto));

    let source = region_state(&moto, SOURCE).await;
    assert_eq!(source["things"].as_object().unwrap().len(), fleet.things);
    assert_eq!(source["things"]["dev-0001"]["billing_group"], "premium");
    assert_eq!(source["types"]["retired"]["deprecated"], true);
    // Shadow versions count the writes each region saw: a sync writes a
    // shadow's state once, however many updates made it in the source.
    assert_same(&without_shadow_versions(source.clone()), &without_shadow_versions(region_state(&moto, TARGET).await));

    // Synced again: the ledger holds every shadow version already.
    let again = sync(&moto, &test, &[]);
    assert_eq!(again["run"]["dead_letters"], 0, "{again}");
    let shadows = source["things"].as_object().unwrap().values().map(|t| t["shadows"].as_object().unwrap().len());
    assert_eq!(again["run"]["stale"], shadows.sum::<usize>(), "{again}");
    assert_same(&without_shadow_versions(source), &without_shadow_versions(region_state(&moto, TARGET).await));
}

#[tokio::test]
async fn a_sync_killed_midway_resumes_to_the_same_end_state() {
    let moto = Moto::start();
    seed(&moto, SOURCE, 300).await;
    let test = Run::new(SOURCE, &moto.url, TARGET, &moto.url, &[], "");
    let mut child = spawn(&moto, &test, "sync");
    // Killed while it copies things (100 a page): some are there, not all.
    let target = moto.iot(TARGET).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let listed = target.list_things().send().await.unwrap().things.unwrap_or_default().len();
        if listed >= 50 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the sync ended before it could be killed");
        assert!(std::time::Instant::now() < deadline, "no things arrived");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let summary = sync(&moto, &test, &[]);
    assert_eq!(summary["run"]["dead_letters"], 0, "{summary} {:?}", test.dead_letters(&moto));
    assert_same(
        &without_shadow_versions(region_state(&moto, SOURCE).await),
        &without_shadow_versions(region_state(&moto, TARGET).await),
    );
    // It resumed at its page: a whole listing (a finished sync starts again) reads more.
    let whole = sync(&moto, &test, &[]);
    let records = |s: &Value| s["run"]["records"].as_u64().unwrap();
    assert!(records(&summary) < records(&whole), "resumed {summary}, whole {whole}");
}

#[tokio::test]
async fn a_sync_is_refused_while_a_run_holds_the_state_folder() {
    let moto = Moto::start();
    let test = Run::new(SOURCE, &moto.url, TARGET, &moto.url, &[], "");
    // A live run, following its (empty) file.
    let mut live = spawn(&moto, &test, "run");
    let lock = test.dir.path().join(".iotdr-state/lock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_to_string(&lock).unwrap_or_default().trim() != live.id().to_string() {
        assert!(live.try_wait().unwrap().is_none(), "the live run ended");
        assert!(std::time::Instant::now() < deadline, "the live run never took the state folder");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let out = iotdr(&moto, test.dir.path(), &["sync", test.pipeline.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("in use by another iotdr run or sync (pid {})", live.id())), "{stderr}");
    live.kill().unwrap();
    live.wait().unwrap();
    // Its death frees the folder.
    let summary = sync(&moto, &test, &[]);
    assert_eq!(summary["run"]["dead_letters"], 0, "{summary}");
}

/// `--mode smart` compares before it writes: nothing on a synced fleet,
/// only the drift on a drifted one (content, not existence: a changed
/// attribute of a thing that exists is written).
#[tokio::test]
async fn a_smart_sync_writes_only_what_differs() {
    let moto = Moto::start();
    seed(&moto, SOURCE, 30).await;
    let test = Run::new(SOURCE, &moto.url, TARGET, &moto.url, &[], "");
    sync(&moto, &test, &[]);

    let again = sync(&moto, &test, &["--mode", "smart"]);
    assert_eq!((&again["drifted"], &again["run"]["changes"]), (&0.into(), &0.into()), "{again}");
    assert!(again["compared"].as_u64().unwrap() > 30, "{again}");

    let iot = moto.iot(TARGET).await;
    let attributes = aws_sdk_iot::types::AttributePayload::builder().attributes("site", "nowhere").merge(true).build();
    iot.update_thing().thing_name("dev-0004").attribute_payload(attributes).send().await.unwrap();
    let repaired = sync(&moto, &test, &["--mode", "smart"]);
    assert_eq!(repaired["drifted"], 1, "{repaired}");
    assert_eq!(repaired["run"]["dead_letters"], 0, "{repaired}");
    assert_same(
        &without_shadow_versions(region_state(&moto, SOURCE).await),
        &without_shadow_versions(region_state(&moto, TARGET).await),
    );
}

/// A smart sync into an empty region copies everything: the source read in
/// bulk, the PEMs read for the certificates the target lacks, memberships
/// written after their things; then there is nothing left to write.
#[tokio::test]
async fn a_smart_sync_into_an_empty_region_copies_everything() {
    let moto = Moto::start();
    seed(&moto, SOURCE, 20).await;
    let test = Run::new(SOURCE, &moto.url, TARGET, &moto.url, &[], "");
    let summary = sync(&moto, &test, &["--mode", "smart"]);
    assert_eq!(summary["run"]["dead_letters"], 0, "{summary}");
    assert_eq!(summary["run"]["stale"], 0, "nothing of a first copy is older than what it copies: {summary}");
    assert_same(
        &without_shadow_versions(region_state(&moto, SOURCE).await),
        &without_shadow_versions(region_state(&moto, TARGET).await),
    );
    let again = sync(&moto, &test, &["--mode", "smart"]);
    assert_eq!((&again["drifted"], &again["run"]["changes"]), (&0.into(), &0.into()), "{again}");
}

/// A target that does not answer is named before anything is written,
/// not retried for hours at the first write: the reachable target of the
/// same pipeline stays empty.
#[tokio::test]
async fn a_sync_with_an_unreachable_target_names_it_before_any_write() {
    let moto = Moto::start();
    seed(&moto, SOURCE, 5).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let test = Run::new(SOURCE, &moto.url, TARGET, &moto.url, &[], "");
    let text = std::fs::read_to_string(&test.pipeline).unwrap().replace(
        r#"targets = ["eu-west-1"]"#,
        &format!(
            "targets = [\"eu-west-1\", \"eu-central-1\"]\n\n[regions.eu-central-1]\nendpoint_url = \"http://127.0.0.1:{closed}\""
        ),
    );
    std::fs::write(&test.pipeline, text).unwrap();
    let out = iotdr(&moto, test.dir.path(), &["sync", test.pipeline.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("target region eu-central-1 does not answer a read"), "{stderr}");
    assert!(stderr.contains("nothing was written"), "{stderr}");
    let written = moto.iot(TARGET).await.list_things().send().await.unwrap().things.unwrap_or_default();
    assert!(written.is_empty(), "{written:?}");
}

/// Before writing, a sync asks IAM's policy simulator whether its caller
/// may write in every target. moto has no simulator (it answers 500): the
/// sync says the permissions were not checked, and goes on.
#[tokio::test]
async fn a_sync_says_when_it_cannot_check_write_permissions_and_goes_on() {
    let moto = Moto::start();
    seed(&moto, SOURCE, 2).await;
    let iam = aws_sdk_iam::Client::new(&moto.sdk_config(SOURCE).await);
    iam.create_user().user_name("syncer").send().await.unwrap();
    let key = iam.create_access_key().user_name("syncer").send().await.unwrap().access_key.unwrap();
    let test = Run::new(SOURCE, &moto.url, TARGET, &moto.url, &[], "");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_iotdr"))
        .args(["sync", test.pipeline.to_str().unwrap()])
        .current_dir(test.dir.path())
        .env("IOTDR_CACHE_DIR", common::cache_dir())
        .envs(moto.env())
        .env("AWS_ACCESS_KEY_ID", &key.access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", &key.secret_access_key)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("write permissions not checked before writing: SimulatePrincipalPolicy for arn:aws:iam::123456789012:user/syncer failed"),
        "{stderr}"
    );
    assert!(!stderr.contains(&key.secret_access_key), "the secret key is never logged");
    let things = moto.iot(TARGET).await.list_things().send().await.unwrap().things.unwrap_or_default();
    assert_eq!(things.len(), 2);
}

/// `--query` copies the things fleet indexing finds, each whole (its
/// attributes, memberships, certificates and shadows), and nothing of the others.
#[tokio::test]
async fn a_sync_with_a_query_copies_only_the_things_it_finds() {
    let moto = Moto::start();
    seed(&moto, SOURCE, 30).await;
    let test = Run::new(SOURCE, &moto.url, TARGET, &moto.url, &[], "");
    let summary = sync(&moto, &test, &["--query", "thingName:dev-000*"]);
    assert_eq!(summary["run"]["dead_letters"], 0, "{summary}");
    let source = without_shadow_versions(region_state(&moto, SOURCE).await);
    let target = without_shadow_versions(region_state(&moto, TARGET).await);
    let copied: Vec<&String> = target["things"].as_object().unwrap().keys().collect();
    let wanted: Vec<String> = (0..10).map(|i| format!("dev-{i:04}")).collect();
    assert_eq!(copied, wanted.iter().collect::<Vec<_>>());
    for name in &wanted {
        assert_eq!(source["things"][name], target["things"][name], "{name}");
    }
    assert_eq!(source["groups"], target["groups"]);

    // A smart sync with the same query compares those things only: the
    // others, never copied, are not missing; an edited one is repaired.
    let again = sync(&moto, &test, &["--mode", "smart", "--query", "thingName:dev-000*"]);
    assert_eq!(again["drifted"], 0, "{again}");
    let iot = moto.iot(TARGET).await;
    let attributes = aws_sdk_iot::types::AttributePayload::builder().attributes("site", "nowhere").merge(true).build();
    iot.update_thing().thing_name("dev-0003").attribute_payload(attributes).send().await.unwrap();
    let repaired = sync(&moto, &test, &["--mode", "smart", "--query", "thingName:dev-000*"]);
    assert_eq!((&repaired["drifted"], &repaired["run"]["dead_letters"]), (&1.into(), &0.into()), "{repaired}");
    let target = without_shadow_versions(region_state(&moto, TARGET).await);
    assert_eq!(source["things"]["dev-0003"], target["things"]["dev-0003"]);
}

#[tokio::test]
async fn a_sync_into_the_event_table_is_replicated_by_the_live_run() {
    let moto = Moto::start();
    seed(&moto, SOURCE, 40).await;
    let iot = moto.iot(SOURCE).await;
    let properties = aws_sdk_iot::types::BillingGroupProperties::builder().billing_group_description("premium").build();
    iot.create_billing_group().billing_group_name("premium").billing_group_properties(properties).send().await.unwrap();
    iot.add_thing_to_billing_group().billing_group_name("premium").thing_name("dev-0003").send().await.unwrap();
    moto.event_table(SOURCE, "iotdr-events").await;
    let test = Run::new(SOURCE, &moto.url, TARGET, &moto.url, &[], "");
    test.read_stream("iotdr-events");

    let copied = sync(&moto, &test, &["--into-table"]);
    assert_eq!(copied["mode"], "into-table", "{copied}");
    // Nothing is applied by the copy itself.
    assert!(moto.iot(TARGET).await.list_things().send().await.unwrap().things.unwrap_or_default().is_empty());

    // The live run reads the items from the stream, through its stages.
    let summary = test.run(&moto);
    assert_eq!(summary["run"]["dead_letters"], 0, "{summary} {:?}", test.dead_letters(&moto));
    let source = region_state(&moto, SOURCE).await;
    assert_eq!(source["things"].as_object().unwrap().len(), 40);
    assert_same(&without_shadow_versions(source), &without_shadow_versions(region_state(&moto, TARGET).await));
}
