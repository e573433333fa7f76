//! Hostile use of the API: random sequences of every call, with NULL and garbage arguments,
//! gone and invented handles, calls from a second thread, the client freed in the middle,
//! against a live local server. Nothing may crash or panic across the boundary, every call
//! must answer with a real status, and the callback contract must hold throughout: events only
//! on the dispatching thread, nothing after a connection's final callback, at most one final.
//!
//! Deterministic (a fixed seed); WSCLIENT_FUZZ_OPS=N runs longer (default 20,000 calls).

mod common;

use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::os::raw::c_char;
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::server::TestServer;
use common::*;
use wsclient::testing::Rng;

/// What the callbacks saw, checked as they run.
#[derive(Default)]
struct Contract {
    finals: Mutex<HashSet<WsConn>>,
    events: Mutex<HashMap<WsConn, u32>>,
    dispatcher: Mutex<Option<std::thread::ThreadId>>,
    violations: Mutex<Vec<String>>,
}

impl Contract {
    fn saw(&self, conn: WsConn, is_final: bool) {
        let mut violations = self.violations.lock().unwrap();
        if Some(std::thread::current().id()) != *self.dispatcher.lock().unwrap() {
            violations.push(format!("callback for {conn:#x} outside the dispatching thread"));
        }
        let mut finals = self.finals.lock().unwrap();
        if finals.contains(&conn) {
            violations.push(format!("event for {conn:#x} after its final callback"));
        }
        if is_final {
            finals.insert(conn);
        }
        *self.events.lock().unwrap().entry(conn).or_default() += 1;
    }
}

unsafe fn contract<'a>(user: *mut c_void) -> &'a Contract {
    &*(user as *const Contract)
}
unsafe extern "C" fn c_open(conn: WsConn, user: *mut c_void) {
    contract(user).saw(conn, false);
}
unsafe extern "C" fn c_message(conn: WsConn, _d: *const u8, _l: usize, _k: WsMessageKind, user: *mut c_void) {
    contract(user).saw(conn, false);
    // Re-entrant calls from inside a callback, as hosts make them.
    if (conn ^ _l as u64) % 3 == 0 {
        ws_message_complete(conn);
    }
}
unsafe extern "C" fn c_close(conn: WsConn, _c: u16, _r: *const c_char, _l: usize, user: *mut c_void) {
    contract(user).saw(conn, true);
}
unsafe extern "C" fn c_error(conn: WsConn, _k: WsStatus, _m: *const c_char, user: *mut c_void) {
    contract(user).saw(conn, true);
}

fn is_real_status(status: WsStatus) -> bool {
    WsStatus::from_u32(status as u32) == Some(status) && status != WsStatus::Panic
}

/// One random call on a handle-based function; usable from any thread.
fn handle_call(rng: &mut Rng, conn: WsConn, user: *mut c_void) -> WsStatus {
    let data = rng.bytes(64);
    let cstring = std::ffi::CString::new(data.iter().map(|b| b.max(&1)).copied().collect::<Vec<u8>>()).unwrap();
    let ptr_or_null = |rng: &mut Rng, p: *const c_char| if rng.below(5) == 0 { null() } else { p };
    unsafe {
        match rng.below(13) {
            0 => ws_send(conn, ptr_or_null(rng, data.as_ptr().cast()), data.len()),
            1 => ws_send_binary(conn, ptr_or_null(rng, data.as_ptr().cast()).cast(), data.len()),
            2 => ws_close(conn, rng.below(6000) as u16, ptr_or_null(rng, cstring.as_ptr())),
            3 => ws_set_flow_control(conn, rng.below(2) == 0),
            4 => ws_message_complete(conn),
            5 => ws_on_open(conn, if rng.below(4) == 0 { None } else { Some(c_open) }, user),
            6 => ws_on_message(conn, Some(c_message), user),
            7 => ws_on_close(conn, Some(c_close), user),
            8 => ws_on_error(conn, Some(c_error), user),
            9 => {
                let mut n = 0usize;
                ws_buffered_amount(conn, if rng.below(4) == 0 { null_mut() } else { &mut n })
            }
            10 => {
                let mut buf = [0 as c_char; 8];
                let mut len = 0usize;
                let size = rng.below(9) as usize;
                ws_protocol(conn, if rng.below(4) == 0 { null_mut() } else { buf.as_mut_ptr() }, size, &mut len)
            }
            11 => {
                // The reason is `data` when the length fits in it, else NULL (a NULL with a length).
                let len = if rng.below(5) == 0 { rng.below(200) as usize } else { rng.below(65) as usize };
                let reason = if len > data.len() { null() } else { data.as_ptr().cast() };
                ws_close_with_reason(conn, rng.below(6000) as u16, reason, len)
            }
            _ => ws_send(conn, cstring.as_ptr(), cstring.as_bytes().len()),
        }
    }
}

#[test]
fn random_call_sequences_never_break_the_contract() {
    let ops: u64 = std::env::var("WSCLIENT_FUZZ_OPS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let server = TestServer::start();
    let urls = [
        server.url("/echo"),
        server.url("/push?n=20"),
        server.url("/close?code=4000"),
        server.url("/drop"),
        server.url("/reject"),
        format!("ws://127.0.0.1:{}/", server.blackhole_port),
        format!("ws://127.0.0.1:{}/", closed_port()),
        "http://not-a-websocket/".into(),
        "".into(),
    ];
    let contract = Arc::new(Contract::default());
    *contract.dispatcher.lock().unwrap() = Some(std::thread::current().id());
    let user = Arc::as_ptr(&contract) as *mut c_void;
    let handles: Arc<Mutex<Vec<WsConn>>> = Arc::new(Mutex::new(vec![0, 1, u64::MAX]));
    let stop = Arc::new(AtomicBool::new(false));

    // A second thread hammers the handles the first one makes, gone or not.
    let other = {
        let (handles, stop, contract) = (handles.clone(), stop.clone(), contract.clone());
        std::thread::spawn(move || {
            let user = Arc::as_ptr(&contract) as *mut c_void;
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let mut calls = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let list = handles.lock().unwrap().clone();
                let conn = list[rng.below(list.len() as u64) as usize];
                let status = handle_call(&mut rng, conn, user);
                assert!(is_real_status(status), "status {status:?}");
                calls += 1;
            }
            calls
        })
    };

    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut client = ws_client_new();
    let (mut made, mut frees) = (0u64, 0u64);
    for _ in 0..ops {
        let status = match rng.below(10) {
            0 | 1 => {
                let url = cstr(&urls[rng.below(urls.len() as u64) as usize]);
                let mut conn = 0;
                let status = unsafe {
                    ws_connect(client, url.as_ptr(), if rng.below(20) == 0 { null_mut() } else { &mut conn })
                };
                if status == WsStatus::Ok {
                    made += 1;
                    ws_on_open(conn, Some(c_open), user);
                    ws_on_message(conn, Some(c_message), user);
                    ws_on_close(conn, Some(c_close), user);
                    ws_on_error(conn, Some(c_error), user);
                    handles.lock().unwrap().push(conn);
                }
                status
            }
            2 | 3 => unsafe {
                let (mut ran, mut more) = (0u32, false);
                ws_dispatch(if rng.below(20) == 0 { null_mut() } else { client }, &mut ran, &mut more)
            },
            4 => unsafe { ws_run(client, rng.below(3) as i32) },
            5 if rng.below(100) == 0 => {
                // Free in the middle, with whatever is alive; then start over.
                let status = unsafe { ws_client_free(client) };
                frees += 1;
                client = ws_client_new();
                status
            }
            _ => {
                let list = handles.lock().unwrap().clone();
                let conn = list[rng.below(list.len() as u64) as usize];
                handle_call(&mut rng, conn, user)
            }
        };
        assert!(is_real_status(status), "status {status:?}");
    }
    // Let everything finish: close what is alive, dispatch until no connection is left.
    for conn in handles.lock().unwrap().clone() {
        unsafe { ws_close(conn, 0, null()) };
    }
    let status = unsafe { ws_run(client, 30_000) };
    stop.store(true, Ordering::Relaxed);
    let other_calls = other.join().unwrap();
    assert_eq!(unsafe { ws_client_free(client) }, WsStatus::Ok);
    eprintln!(
        "{ops} calls on the dispatching thread and {other_calls} on the other, {made} connections, {frees} frees mid-run, {} final callbacks",
        contract.finals.lock().unwrap().len()
    );
    assert_eq!(status, WsStatus::Ok, "ws_run: {}", last_error());
    let violations = contract.violations.lock().unwrap();
    assert!(violations.is_empty(), "{:#?}", &violations[..violations.len().min(10)]);
}
