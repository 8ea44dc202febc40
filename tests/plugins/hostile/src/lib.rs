//! A plug-in that misbehaves on purpose, for the host's tests. Each misdeed
//! fires only on events whose name is configured, so a test can check that
//! the other events of the batch still pass.

use iotdr_plugin::{Event, Outcome, Stage};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Spin forever.
    loop_on: Option<String>,
    /// Allocate until memory runs out.
    bomb_on: Option<String>,
    /// Execute `unreachable`.
    trap_on: Option<String>,
    /// Panic with a message.
    panic_on: Option<String>,
    /// Return a retryable failure this many times per instance, then keep.
    #[serde(default)]
    flaky_failures: u32,
    /// Try to read a file, open a socket and read the environment; record what happened.
    #[serde(default)]
    probe_sandbox: bool,
    /// Fail init with this message.
    refuse_init: Option<String>,
    /// Return one outcome more than there are events (a contract violation).
    #[serde(default)]
    wrong_outcome_count: bool,
}

pub struct Hostile {
    config: Config,
    failures_left: u32,
}

impl Stage for Hostile {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if let Some(message) = &config.refuse_init {
            return Err(message.clone());
        }
        Ok(Hostile { failures_left: config.flaky_failures, config })
    }

    fn process(&mut self, batch: &iotdr_plugin::Batch) -> Vec<Outcome> {
        if self.config.wrong_outcome_count {
            // One outcome too many (an empty list would mean "all kept").
            return (0..=batch.len()).map(|_| Outcome::Drop("extra".into())).collect();
        }
        (0..batch.len()).map(|i| self.process_event(&batch.event(i))).collect()
    }

    fn process_event(&mut self, event: &Event) -> Outcome {
        let name = event.name();
        let is = |target: &Option<String>| target.as_deref() == Some(name.as_str());
        // Change the event first: the host must undo this when the call fails.
        event.set_attribute("touched-by-hostile", "yes");
        if is(&self.config.loop_on) {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        if is(&self.config.bomb_on) {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        if is(&self.config.trap_on) {
            #[cfg(target_arch = "wasm32")]
            core::arch::wasm32::unreachable();
        }
        if is(&self.config.panic_on) {
            panic!("hostile plug-in refuses {name}");
        }
        if self.failures_left > 0 {
            self.failures_left -= 1;
            return Outcome::Fail { message: "flaky".into(), retryable: true };
        }
        if self.config.probe_sandbox {
            let file = match std::fs::read_to_string("/etc/hostname") {
                Ok(_) => "read".to_string(),
                Err(e) => format!("denied: {e}"),
            };
            let socket = match std::net::TcpStream::connect("127.0.0.1:22") {
                Ok(_) => "connected".to_string(),
                Err(e) => format!("denied: {e}"),
            };
            let env = std::env::vars().count().to_string();
            event.set_attribute("probe-file", &file);
            event.set_attribute("probe-socket", &socket);
            event.set_attribute("probe-env-vars", &env);
        }
        Outcome::Keep
    }
}

iotdr_plugin::export_stage!(Hostile);
