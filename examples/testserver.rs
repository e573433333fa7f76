//! The bundled local test server for the C examples, the JS host's tests and `make demo`.
//! Prints one line of shell assignments (ws_port=.. wss_port=.. ca=..), then serves until its
//! standard input closes (or it is killed).

#[path = "../tests/common/server.rs"]
mod server;

use std::io::{Read, Write};

fn main() {
    let server = server::TestServer::start();
    println!(
        "ws_port={} wss_port={} blackhole_port={} ca={}",
        server.port,
        server.tls_port,
        server.blackhole_port,
        server.ca_pem.display()
    );
    std::io::stdout().flush().unwrap();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}
