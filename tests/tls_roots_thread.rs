//! The system trust store is read off the library's I/O thread: while it is being read, the
//! client's other connections go on. Here SSL_CERT_FILE is a FIFO that gives its certificate
//! only when the test says, standing in for a store that is slow to read. A test binary of its
//! own: it changes the process environment.

mod common;

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::mpsc;

use common::server::TestServer;
use common::*;

/// The writing end of the FIFO, once a reader has opened it. Dropping it writes the CA and
/// closes, so that the reader finishes however the test ends (a client is freed only once
/// its I/O thread can stop).
struct Writer {
    file: Option<File>,
    ca_pem: PathBuf,
}

impl Writer {
    fn release(&mut self) {
        if let Some(mut file) = self.file.take() {
            file.write_all(&std::fs::read(&self.ca_pem).unwrap()).unwrap();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.release();
    }
}

#[test]
fn reading_the_trust_store_does_not_stall_the_other_connections() {
    let server = TestServer::start();
    let fifo = server.dir.join("slow-store.pem");
    let path = CString::new(fifo.as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0, "{}", std::io::Error::last_os_error());
    std::env::set_var("SSL_CERT_FILE", &fifo);
    std::env::remove_var("SSL_CERT_DIR");
    // Opening a FIFO for writing returns once a reader has opened it: when the trust store is
    // being read.
    let (opened, reader_came) = mpsc::channel();
    let fifo_for_writer = fifo.clone();
    std::thread::spawn(move || opened.send(File::options().write(true).open(fifo_for_writer).unwrap()).unwrap());

    let client = Client::new();
    let rec = Recorder::default();
    let secure = client.connect(&server.wss_url("localhost", "/echo"));
    watch(secure, &rec);
    let file = reader_came.recv_timeout(DEADLINE).expect("the trust store is read at the first wss connection");
    // Declared after the client: dropped before it.
    let mut writer = Writer { file: Some(file), ca_pem: server.ca_pem.clone() };

    let plain = client.connect(&format!("ws://127.0.0.1:{}/echo", server.port));
    watch(plain, &rec);
    assert_eq!(send_text(plain, "while the trust store is read"), WsStatus::Ok);
    client.run_until("the plain echo", || !rec.texts(plain).is_empty() || rec.finals(plain) > 0);
    assert_eq!(rec.texts(plain), ["while the trust store is read"], "{:?}", rec.of(plain));
    assert_eq!(rec.of(secure), [], "the wss connection waits for the trust store");

    writer.release();
    assert_eq!(send_text(secure, "trusted once read"), WsStatus::Ok);
    client.run_until("the wss echo", || !rec.texts(secure).is_empty() || rec.finals(secure) > 0);
    assert_eq!(rec.texts(secure), ["trusted once read"], "{:?}", rec.of(secure));
}
