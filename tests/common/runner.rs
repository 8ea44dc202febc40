//! Runs the `iotdr` binary on a pipeline written for a test.

use super::moto::Moto;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Run {
    pub dir: tempfile::TempDir,
    pub pipeline: PathBuf,
}

impl Run {
    /// A pipeline without stages from `events` (a file) in `source` to
    /// `target`, each at its endpoint; state in a temp folder; fast retries.
    pub fn new(source: &str, source_url: &str, target: &str, target_url: &str, events: &[String], extra: &str) -> Run {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("events.jsonl"), events.join("\n") + "\n").unwrap();
        let pipeline = dir.path().join("pipeline.toml");
        std::fs::write(
            &pipeline,
            format!(
                r#"
[pipeline]
name = "test"
source_region = "{source}"
targets = ["{target}"]

[regions.{source}]
endpoint_url = "{source_url}"

[regions.{target}]
endpoint_url = "{target_url}"

[source]
kind = "file"
path = "events.jsonl"

[apply]
initial_backoff_ms = 10
max_backoff_ms = 200
{extra}
"#
            ),
        )
        .unwrap();
        Run { dir, pipeline }
    }

    /// `iotdr run --until-idle`; asserts success and returns the summary.
    pub fn run(&self, moto: &Moto) -> Value {
        self.run_with(moto, &[])
    }

    /// The same with `--from-start`: the whole file again, a replay.
    pub fn rerun(&self, moto: &Moto) -> Value {
        self.run_with(moto, &["--from-start"])
    }

    fn run_with(&self, moto: &Moto, args: &[&str]) -> Value {
        let mut all = vec!["run", self.pipeline.to_str().unwrap(), "--until-idle"];
        all.extend_from_slice(args);
        let out = iotdr(moto, self.dir.path(), &all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // IOTDR_TEST_LOG=<filter> keeps each run's log in the system temp folder.
        if std::env::var_os("IOTDR_TEST_LOG").is_some() {
            let log = std::env::temp_dir().join(format!("iotdr-test-{}.log", std::process::id()));
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
            std::io::Write::write_all(&mut file, &out.stderr).unwrap();
        }
        assert!(out.status.success(), "iotdr run failed:\n{stderr}");
        let line =
            stderr.lines().find(|l| l.starts_with("summary: ")).unwrap_or_else(|| panic!("no summary in:\n{stderr}"));
        serde_json::from_str(line.trim_start_matches("summary: ")).unwrap()
    }
}

impl Run {
    /// `iotdr run --until-idle` started in the background, its output kept in the test's folder.
    pub fn spawn(&self, moto: &Moto) -> std::process::Child {
        let log = std::fs::File::create(self.dir.path().join("run.log")).unwrap();
        Command::new(env!("CARGO_BIN_EXE_iotdr"))
            .args(["run", self.pipeline.to_str().unwrap(), "--until-idle"])
            .current_dir(self.dir.path())
            .env("IOTDR_CACHE_DIR", super::cache_dir())
            .env("IOTDR_LOG", super::log_filter())
            .envs(moto.env())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("iotdr runs")
    }

    /// What a process from [`Run::spawn`] wrote on stderr.
    pub fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("run.log")).unwrap_or_default();
        super::assert_no_secrets("a run's log", &log);
        log
    }

    /// Makes the pipeline read the stream of `table` (in the source region) instead of its file.
    pub fn read_stream(&self, table: &str) {
        let text = std::fs::read_to_string(&self.pipeline).unwrap();
        let from = text.lines().find(|l| l.starts_with("path = ")).expect("a file source").to_string();
        let text = text
            .replace(&from, &format!("table = \"{table}\""))
            .replace("kind = \"file\"", "kind = \"dynamodb-stream\"");
        std::fs::write(&self.pipeline, text).unwrap();
    }

    /// Replaces the pipeline's `[source]` table by `table` (its lines).
    pub fn read_source(&self, table: &str) {
        let text = std::fs::read_to_string(&self.pipeline).unwrap();
        let start = text.find("[source]\n").expect("a source table") + "[source]\n".len();
        let end = start + text[start..].find("\n[").expect("a table after the source");
        std::fs::write(&self.pipeline, format!("{}{table}{}", &text[..start], &text[end..])).unwrap();
    }

    /// Points the pipeline's file source at a new file `name` holding `events`.
    pub fn read_next(&self, name: &str, events: &[String]) {
        std::fs::write(self.dir.path().join(name), events.join("\n") + "\n").unwrap();
        let text = std::fs::read_to_string(&self.pipeline).unwrap();
        let from = text.lines().find(|l| l.starts_with("path = ")).expect("a file source").to_string();
        std::fs::write(&self.pipeline, text.replace(&from, &format!("path = \"{name}\""))).unwrap();
    }

    /// `iotdr dead-letters replay`, parsed; asserts it exited with `code`.
    pub fn replay(&self, moto: &Moto, code: i32) -> Value {
        let out = iotdr(moto, self.dir.path(), &["dead-letters", "replay", self.pipeline.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(code), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `iotdr dead-letters list`, parsed.
    pub fn dead_letters(&self, moto: &Moto) -> Vec<Value> {
        let out = iotdr(moto, self.dir.path(), &["dead-letters", "list", self.pipeline.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

/// A `[[stage]]` table, to pass as [`Run::new`]'s `extra`: it follows the
/// `[apply]` keys, so it ends that table.
pub fn stage(name: &str, plugin: &Path, config: &str, on_error: &str) -> String {
    format!(
        "\n[[stage]]\nname = \"{name}\"\nplugin = \"{}\"\nconfig = {config}\non_error = \"{on_error}\"\n",
        plugin.display()
    )
}

pub fn iotdr(moto: &Moto, dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_iotdr"))
        .args(args)
        .current_dir(dir)
        .env("IOTDR_CACHE_DIR", super::cache_dir())
        .env("IOTDR_LOG", super::log_filter())
        .envs(moto.env())
        .output()
        .expect("iotdr runs");
    super::assert_no_secrets(&format!("iotdr {}", args.join(" ")), &String::from_utf8_lossy(&out.stderr));
    super::assert_no_secrets(&format!("iotdr {}", args.join(" ")), &String::from_utf8_lossy(&out.stdout));
    out
}
