//! A local DNS server for one test (Debian's dnsmasq, started by the
//! project's own script): it answers the records the test sets, TTL 0, and
//! is stopped when dropped.

use std::net::SocketAddr;
use std::process::Command;

pub struct Dns {
    pub address: SocketAddr,
    dir: tempfile::TempDir,
}

impl Dns {
    /// Serves `records` (dnsmasq lines: `cname=`, `txt-record=`, `host-record=`).
    pub fn start(records: &str) -> Dns {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("records.conf"), records).unwrap();
        let out = script("start", dir.path());
        let port: u16 = out.trim().parse().expect("a port");
        Dns { address: SocketAddr::from(([127, 0, 0, 1], port)), dir }
    }

    /// Answers `records` from now on (dnsmasq started again on the same port).
    pub fn set(&self, records: &str) {
        std::fs::write(self.dir.path().join("records.conf"), records).unwrap();
        script("reload", self.dir.path());
    }
}

fn script(command: &str, dir: &std::path::Path) -> String {
    let script = super::root().join("scripts/dnsmasq.sh");
    let out = Command::new("bash").arg(&script).arg(command).arg(dir).output().expect("bash runs");
    assert!(out.status.success(), "scripts/dnsmasq.sh {command} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Drop for Dns {
    fn drop(&mut self) {
        script("stop", self.dir.path());
    }
}

/// The records of a failover name: `name` a CNAME to the `primary` region's
/// broker host, `_name` its TXT decision, each broker host's address.
pub fn failover_records(name: &str, primary: &str, secondary: &str, hosts: &[(&str, &str, &str)]) -> String {
    let host_of = |region: &str| hosts.iter().find(|(r, _, _)| *r == region).map(|(_, host, _)| *host).unwrap();
    let mut text = format!("cname={name},{}\n", host_of(primary));
    text.push_str(&format!(
        "txt-record=_{name},\"{{\\\"primary\\\": \\\"{primary}\\\", \\\"secondary\\\": \\\"{secondary}\\\"}}\"\n"
    ));
    for (_, host, ip) in hosts {
        text.push_str(&format!("host-record={host},{ip}\n"));
    }
    text
}
