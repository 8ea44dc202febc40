//! The fault-injecting proxy (`tests/fault_proxy.py`) in front of a moto server.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

pub struct FaultProxy {
    pub url: String,
    child: Child,
}

impl FaultProxy {
    /// Fails `rate` of the requests to `upstream` (throttling, 5xx, slow or dropped connections).
    pub fn start(upstream: &str, rate: f64) -> FaultProxy {
        let script = super::root().join("tests/fault_proxy.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .args(["--upstream", upstream, "--rate", &rate.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs the fault proxy");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("the proxy's address");
        let url = line.trim().to_string();
        assert!(url.starts_with("http://127.0.0.1:"), "fault proxy said {url:?}");
        FaultProxy { url, child }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
