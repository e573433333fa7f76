//! Independent peers started by the tests: Python's `websockets` (tests/peers/py_server.py,
//! installed into .venv by `make test`) and Node's `ws` (tests/peers/node_server.js, installed
//! into tests/peers/node_modules by `make test`). Both print the same lines.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub struct Peer {
    child: Child,
    pub port: u16,
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl Peer {
    /// Python's websockets.
    pub fn start_python() -> Peer {
        Self::start_python_in("")
    }

    /// Python's websockets in a mode of py_server.py: "" (no compression), "deflate" (its
    /// permessage-deflate defaults) or "deflate-open" (permessage-deflate, no limits of its own).
    pub fn start_python_in(mode: &str) -> Peer {
        Self::start_python_script("py_server.py", &[OsStr::new(mode)])
    }

    /// Python's websockets over Python's ssl (tests/peers/py_tls_server.py), requiring a client
    /// certificate signed by `client_ca` (all three are PEM files).
    pub fn start_python_tls(cert: &Path, key: &Path, client_ca: &Path) -> Peer {
        Self::start_python_script("py_tls_server.py", &[cert.as_os_str(), key.as_os_str(), client_ca.as_os_str()])
    }

    fn start_python_script(script: &str, args: &[&OsStr]) -> Peer {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let python = root.join(".venv/bin/python");
        assert!(python.exists(), "{} is missing: run `make test`, which installs the test peers", python.display());
        Self::spawn(Command::new(python).arg(root.join("tests/peers").join(script)).args(args))
    }

    /// Node's ws.
    pub fn start_node() -> Peer {
        Self::start_node_in("")
    }

    /// Node's ws in a mode of node_server.js: "" (no compression) or "deflate".
    pub fn start_node_in(mode: &str) -> Peer {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let module = root.join("tests/peers/node_modules/ws");
        assert!(module.exists(), "{} is missing: run `make test`, which installs the test peers", module.display());
        Self::spawn(Command::new("node").arg(root.join("tests/peers/node_server.js")).arg(mode))
    }

    fn spawn(command: &mut Command) -> Peer {
        let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("start the Python peer");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        let port = first.trim().strip_prefix("port=").and_then(|p| p.parse().ok()).expect("port line");
        let lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                sink.0.lock().unwrap().push(line);
                sink.1.notify_all();
            }
        });
        Peer { child, port, lines }
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// The lines the peer printed so far that start with `prefix`, without it.
    pub fn lines_starting(&self, prefix: &str) -> Vec<String> {
        let lines = self.lines.0.lock().unwrap();
        lines.iter().filter_map(|l| l.strip_prefix(prefix)).map(str::to_owned).collect()
    }

    /// Waits (bounded) until the peer printed `count` lines starting with `prefix`; returns them
    /// without it.
    pub fn wait_for_prefixed(&self, prefix: &str, count: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut lines = self.lines.0.lock().unwrap();
        loop {
            let found: Vec<String> = lines.iter().filter_map(|l| l.strip_prefix(prefix)).map(str::to_owned).collect();
            if found.len() >= count {
                return found;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the peer printed {} lines {prefix:?}, not {count}: {:?}", found.len(), *lines);
            lines = self.lines.1.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Waits (bounded) for a line the peer printed.
    pub fn wait_for_line(&self, wanted: &str) {
        self.wait_for_lines(wanted, 1);
    }

    /// Waits (bounded) until the peer printed `wanted` `count` times.
    pub fn wait_for_lines(&self, wanted: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut lines = self.lines.0.lock().unwrap();
        while lines.iter().filter(|l| *l == wanted).count() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the Python peer never printed {wanted:?}; it printed {:?}", *lines);
            lines = self.lines.1.wait_timeout(lines, left).unwrap().0;
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// The bundled test server (examples/testserver.rs, built by `make`) in a process of its own,
/// so that a test can measure its own process alone.
pub struct ServerProcess {
    child: Child,
    pub ws_port: u16,
}

impl ServerProcess {
    pub fn start() -> ServerProcess {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let binary = root.join("target/release/examples/testserver");
        assert!(binary.exists(), "{} is missing: run `make test`, which builds it", binary.display());
        let mut child = Command::new(binary).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        let ws_port = line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("ws_port="))
            .and_then(|p| p.parse().ok())
            .expect("ports line");
        ServerProcess { child, ws_port }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.ws_port)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}
