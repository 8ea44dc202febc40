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
        FaultProxy::spawn(upstream, &["--rate", &rate.to_string()])
    }

    /// Fails the next `count` requests in a row with `fault` (`throttle`,
    /// `error500`, `error503`, `drop_before`, `permanent`, ...), then forwards everything.
    pub fn burst(upstream: &str, fault: &str, count: u32) -> FaultProxy {
        FaultProxy::spawn(upstream, &["--rate", "0", "--burst", &format!("{fault}:{count}")])
    }

    /// Changes the faults while it runs (see tests/fault_proxy.py): returns the counts so far.
    pub fn set(&self, change: serde_json::Value) -> serde_json::Value {
        let address = self.url.trim_start_matches("http://");
        let body = change.to_string();
        let mut stream = std::net::TcpStream::connect(address).expect("the fault proxy listens");
        let request = format!(
            "POST /__faults HTTP/1.1\r\nHost: {address}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        std::io::Write::write_all(&mut stream, request.as_bytes()).unwrap();
        let mut response = String::new();
        std::io::Read::read_to_string(&mut stream, &mut response).unwrap();
        let json = response.split("\r\n\r\n").nth(1).expect("a body");
        serde_json::from_str(json).expect("JSON counts")
    }

    /// The counts of what was injected and forwarded.
    pub fn counts(&self) -> serde_json::Value {
        self.set(serde_json::json!({}))
    }

    fn spawn(upstream: &str, args: &[&str]) -> FaultProxy {
        let script = super::root().join("tests/fault_proxy.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .args(["--upstream", upstream])
            .args(args)
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
