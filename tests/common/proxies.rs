//! Real proxies for the tests, started on loopback and killed when dropped: tinyproxy (HTTP
//! CONNECT) and microsocks (SOCKS5). Each binds its outgoing connections to an address of its
//! own, so that a server's log ("accepted from IP") shows which way a connection came.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::DEADLINE;

/// Where tinyproxy's and microsocks' connections to servers come from.
pub const TINYPROXY_FROM: &str = "127.0.0.3";
pub const MICROSOCKS_FROM: &str = "127.0.0.2";

/// A proxy process, killed when dropped.
pub struct Daemon {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An address to bind to now; the proxy takes it a moment later.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn program(name: &str) -> &str {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {name}")).output().unwrap().status.success();
    assert!(found, "{name} is needed by the proxy tests: `make deps` installs it (Debian package {name})");
    name
}

/// Waits until the proxy accepts connections (it was just started).
fn wait_listening(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + DEADLINE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{what} exited before it listened: {status}");
        }
        assert!(Instant::now() < deadline, "{what} never listened on port {port}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn scratch_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wsclient-{what}-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// tinyproxy on loopback; outgoing connections from 127.0.0.3. `credentials`: BasicAuth.
/// `connect_ports`: the only ports it tunnels to (all when empty).
pub fn tinyproxy(credentials: Option<(&str, &str)>, connect_ports: &[u16]) -> Daemon {
    let dir = scratch_dir("tinyproxy");
    let port = free_port();
    let mut conf = format!(
        "Port {port}\nListen 127.0.0.1\nBind {TINYPROXY_FROM}\nTimeout 30\nMaxClients 100\nAllow 127.0.0.1\n\
         LogLevel Connect\nLogFile \"{}\"\n",
        dir.join("log").display()
    );
    if let Some((user, password)) = credentials {
        conf.push_str(&format!("BasicAuth {user} {password}\n"));
    }
    for p in connect_ports {
        conf.push_str(&format!("ConnectPort {p}\n"));
    }
    std::fs::write(dir.join("conf"), conf).unwrap();
    let mut child = Command::new(program("tinyproxy"))
        .arg("-d")
        .arg("-c")
        .arg(dir.join("conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(port, &mut child, "tinyproxy");
    Daemon { child, port, dir }
}

/// microsocks on loopback; outgoing connections from 127.0.0.2.
pub fn microsocks(credentials: Option<(&str, &str)>) -> Daemon {
    let dir = scratch_dir("microsocks");
    let port = free_port();
    let mut command = Command::new(program("microsocks"));
    command.args(["-i", "127.0.0.1", "-p", &port.to_string(), "-b", MICROSOCKS_FROM]);
    if let Some((user, password)) = credentials {
        command.args(["-u", user, "-P", password]);
    }
    let mut child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_listening(port, &mut child, "microsocks");
    Daemon { child, port, dir }
}
