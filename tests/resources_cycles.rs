//! 1,000 connect/close cycles leave no open file descriptors, threads or heap behind. A test
//! binary of its own: it counts its whole process.

mod common;

use common::peers::ServerProcess;
use common::*;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

fn heap_in_use() -> usize {
    let info = unsafe { libc::mallinfo2() };
    info.uordblks + info.hblkhd
}

/// One connection: open, echo, close, gone.
fn cycle(client: &Client, server: &ServerProcess, rec: &Recorder) {
    let conn = client.connect(&server.url("/echo"));
    watch(conn, rec);
    assert_eq!(send_text(conn, "ping"), WsStatus::Ok);
    client.run_until("the echo", || rec.texts(conn) == ["ping"]);
    assert_eq!(close(conn, 0, ""), WsStatus::Ok);
    client.run_until_final(rec, conn);
    assert_eq!(rec.of(conn).last(), Some(&Ev::Close(conn, 1000, String::new())));
}

#[test]
fn a_thousand_connect_close_cycles_leave_nothing_behind() {
    let server = ServerProcess::start();
    let client = Client::new();
    let rec = Recorder::default();
    for _ in 0..50 {
        cycle(&client, &server, &rec); // warm-up: the runtime's and malloc's caches fill
    }
    rec.clear();
    let (fds, tasks, heap) = (open_fds(), threads(), heap_in_use());
    let n: usize = std::env::var("CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    for _ in 0..n {
        cycle(&client, &server, &rec);
        rec.clear();
    }
    let (fds_after, tasks_after, heap_after) = (open_fds(), threads(), heap_in_use());
    eprintln!("fds {fds} -> {fds_after}, threads {tasks} -> {tasks_after}, heap {heap} -> {heap_after} bytes");
    assert_eq!(fds_after, fds, "file descriptors");
    assert_eq!(tasks_after, tasks, "threads");
    assert!(heap_after < heap + (32 << 10), "the heap grew from {heap} to {heap_after} bytes over 1,000 connections");
    drop(client);
    assert_eq!(threads(), tasks - 1, "freeing the client stops its I/O thread");
}
