//! Flow control bounds memory: the server pushes 256 MiB while the host completes one message
//! per millisecond; the process's peak RSS grows by less than 32 MiB and every message arrives,
//! in order. The receive queue limit is set far above that bound (1 GiB), so that only flow
//! control can keep memory low. A test binary of its own: it measures its whole process.

mod common;

use std::ffi::c_void;
use std::time::Duration;

use common::peers::ServerProcess;
use common::*;

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

struct Counter {
    next: u64,
    received: u64,
    out_of_order: u64,
}

unsafe extern "C" fn count(_c: WsConn, data: *const u8, len: usize, _k: WsMessageKind, user: *mut c_void) {
    let counter = &mut *(user as *mut Counter);
    let bytes = std::slice::from_raw_parts(data, len);
    if len != 1 << 20 || u64::from_le_bytes(bytes[..8].try_into().unwrap()) != counter.next {
        counter.out_of_order += 1;
    }
    counter.next += 1;
    counter.received += 1;
}

#[test]
fn flow_control_keeps_rss_bounded_while_256_mib_arrive() {
    if skip_under_asan("flow_control_keeps_rss_bounded_while_256_mib_arrive", "ASan inflates the RSS it measures") {
        return;
    }
    let server = ServerProcess::start();
    let client = Client::new();
    let rec = Recorder::default();
    let before = peak_rss_kib();
    let options = Options::new();
    assert_eq!(unsafe { ws_options_set_receive_queue_limit(options.0, 1 << 30) }, WsStatus::Ok);
    let conn = client.connect_with(&server.url(&format!("/push?n=256&size={}", 1 << 20)), options.0);
    watch(conn, &rec);
    let mut counter = Counter { next: 0, received: 0, out_of_order: 0 };
    ws_on_message(conn, Some(count), &mut counter as *mut Counter as *mut c_void);
    assert_eq!(ws_set_flow_control(conn, true), WsStatus::Ok);
    let mut completed = 0;
    while rec.finals(conn) == 0 {
        if client.wait_readable(Duration::from_millis(1)) {
            client.dispatch();
        }
        if counter.received > completed {
            // The host takes a millisecond per message.
            client.wait_readable(Duration::from_millis(1));
            completed = counter.received;
            assert_eq!(ws_message_complete(conn), WsStatus::Ok);
        }
    }
    let growth_kib = peak_rss_kib().saturating_sub(before);
    eprintln!("peak RSS grew by {growth_kib} KiB while 256 MiB arrived");
    assert_eq!((counter.received, counter.out_of_order), (256, 0));
    assert_eq!(rec.of(conn).last(), Some(&Ev::Close(conn, 1000, "done".into())));
    assert!(growth_kib < 32 << 10, "peak RSS grew by {growth_kib} KiB");
}
