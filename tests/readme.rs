//! The README's numbers, pinned: every default in its options and limits tables is the library's
//! actual default, its status table is the header's and `ws_status_str`'s, and the cheap limits
//! are checked by behaviour (the send queue and the message size at their defaults).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{c_void, CStr};
use std::path::Path;

use common::server::TestServer;
use common::*;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// The rows (cells trimmed) of the first Markdown table after the heading `heading`.
fn table_after(text: &str, heading: &str) -> Vec<Vec<String>> {
    let start = text.find(&format!("\n{heading}\n")).unwrap_or_else(|| panic!("README has no heading {heading:?}"));
    let rows: Vec<Vec<String>> = text[start..]
        .lines()
        .skip_while(|l| !l.trim_start().starts_with('|'))
        .take_while(|l| l.trim_start().starts_with('|'))
        .map(|l| {
            let l = l.trim().trim_start_matches('|').trim_end_matches('|');
            l.split('|').map(|c| c.trim().to_owned()).collect()
        })
        .collect();
    assert!(rows.len() > 2, "no table after {heading:?}");
    // The header row and the |---| row are not data.
    rows.into_iter().skip(2).collect()
}

/// The quantities a cell states, in bytes or milliseconds: "30 000 ms, 30 000 ms" is
/// [30000, 30000], "1 MiB (plus one message)" is [1048576], "64 KiB, held only ..." is [65536].
fn quantities(cell: &str) -> Vec<u128> {
    let mut out = Vec::new();
    for part in cell.split(',') {
        let part = part.trim();
        let digits_end = part.find(|c: char| !(c.is_ascii_digit() || c == ' ')).unwrap_or(part.len());
        let number: String = part[..digits_end].chars().filter(|c| *c != ' ').collect();
        if number.is_empty() {
            continue;
        }
        let unit = part[digits_end..].split_whitespace().next().unwrap_or("");
        let scale: u128 = match unit {
            "" | "ms" | "B" => 1,
            "s" => 1000,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            other => panic!("unknown unit {other:?} in {cell:?}"),
        };
        out.push(number.parse::<u128>().unwrap() * scale);
    }
    out
}

fn keepalive(d: &wsclient::testing::Defaults) -> Vec<u128> {
    vec![d.keepalive_interval_ms.expect("keepalive is on by default"), d.keepalive_timeout_ms]
}

#[test]
fn the_option_table_states_the_actual_defaults() {
    let readme = read("README.md");
    let d = wsclient::testing::defaults();
    let numeric: BTreeMap<&str, Vec<u128>> = [
        ("ws_options_set_connect_timeout_ms", vec![d.connect_timeout_ms]),
        ("ws_options_set_close_timeout_ms", vec![d.close_timeout_ms]),
        ("ws_options_set_keepalive", keepalive(&d)),
        ("ws_options_set_max_message_size", vec![d.max_message_size as u128]),
        ("ws_options_set_read_buffer_size", vec![d.read_buffer_size as u128]),
        ("ws_options_set_receive_queue_limit", vec![d.receive_queue_limit as u128]),
        ("ws_options_set_send_queue_limit", vec![d.send_queue_limit as u128]),
        (
            "ws_options_set_deflate_window_bits",
            vec![d.deflate_client_window_bits.into(), d.deflate_server_window_bits.into()],
        ),
        ("ws_options_set_deflate_level", vec![d.deflate_level.into()]),
        ("ws_options_set_deflate_threshold", vec![d.deflate_threshold as u128]),
    ]
    .into();
    let on_off = |on: bool| if on { "on" } else { "off" };
    let switches: BTreeMap<&str, String> = [
        ("ws_options_set_deflate", on_off(d.deflate).to_owned()),
        ("ws_options_set_read_on_dispatch", on_off(d.read_on_dispatch).to_owned()),
        (
            "ws_options_set_deflate_no_context_takeover",
            format!(
                "{}, {}",
                on_off(d.deflate_client_no_context_takeover),
                on_off(d.deflate_server_no_context_takeover)
            ),
        ),
    ]
    .into();
    let lists: BTreeMap<&str, (&str, usize)> = [
        ("ws_options_add_ca_file", ("system store only", d.extra_ca_certificates)),
        ("ws_options_set_client_certificate", ("none", d.client_certificates)),
        ("ws_options_add_header", ("none", d.headers)),
        ("ws_options_add_subprotocol", ("none", d.subprotocols)),
    ]
    .into();
    // Options whose default is a behaviour, said in words, and whether the code has it.
    let behaviours: BTreeMap<&str, (&str, bool)> = [
        ("ws_options_set_proxy", ("from the environment (see Proxies)", d.proxy_from_environment)),
        ("ws_options_set_follow_redirects", ("not followed", d.max_redirects == 0)),
    ]
    .into();
    let mut seen = BTreeSet::new();
    for row in table_after(&readme, "## Options and defaults") {
        let (option, default) = (&row[0], &row[1]);
        let name = option
            .split('`')
            .nth(1)
            .and_then(|f| f.split('(').next())
            .unwrap_or_else(|| panic!("no function named in {option:?}"));
        seen.insert(name.to_owned());
        if let Some(expected) = numeric.get(name) {
            assert_eq!(&quantities(default), expected, "README says {name} defaults to {default:?}");
        } else if let Some(expected) = switches.get(name) {
            assert_eq!(default, expected, "README says {name} defaults to {default:?}");
        } else if let Some((text, count)) = lists.get(name) {
            assert_eq!(default, text, "{name}");
            assert_eq!(*count, 0, "{name}: the default is {default:?}");
        } else if let Some((text, holds)) = behaviours.get(name) {
            assert_eq!(default, text, "{name}");
            assert!(holds, "{name}: the default is not {default:?}");
        } else {
            panic!("README's option table names {name}, which this test does not know");
        }
    }
    // Every option of the header has its row.
    for function in header_functions() {
        if function.starts_with("ws_options_set_") || function.starts_with("ws_options_add_") {
            assert!(seen.contains(&function), "README's option table lacks {function}");
        }
    }
    assert_eq!(seen.len(), numeric.len() + switches.len() + lists.len() + behaviours.len());
}

#[test]
fn the_limits_table_states_the_actual_defaults() {
    let readme = read("README.md");
    let d = wsclient::testing::defaults();
    let expected: Vec<(&str, Vec<u128>)> = vec![
        ("message and frame size", vec![d.max_message_size as u128]),
        (
            "received messages waiting for dispatch (their memory plus 96 bytes each)",
            vec![d.receive_queue_limit as u128],
        ),
        ("messages waiting to be sent (payloads plus 46 bytes each)", vec![d.send_queue_limit as u128]),
        ("connect (DNS + TCP + TLS + upgrade)", vec![d.connect_timeout_ms]),
        ("close (from `ws_close`: queued messages and the close handshake)", vec![d.close_timeout_ms]),
        ("silence before a keepalive ping, then before giving up", keepalive(&d)),
        ("read buffer", vec![d.read_buffer_size as u128]),
    ];
    let rows = table_after(&readme, "## Security");
    assert_eq!(rows.len(), expected.len(), "{rows:#?}");
    for (limit, values) in expected {
        let row =
            rows.iter().find(|r| r[0] == limit).unwrap_or_else(|| panic!("README's limits table lacks {limit:?}"));
        assert_eq!(quantities(&row[1]), values, "README says {limit:?} defaults to {:?}", row[1]);
    }
}

/// The prose of "Flow control and memory bounds" names the two queue limits in bold, each
/// followed by its setter.
#[test]
fn the_flow_control_prose_states_the_actual_queue_limits() {
    let readme = read("README.md");
    let d = wsclient::testing::defaults();
    let section = &readme[readme.find("## Flow control and memory bounds").unwrap()..];
    let section = &section[..section[3..].find("\n## ").unwrap()];
    let mut checked = 0;
    // Odd pieces between "**" are bold; each is followed by the text up to the next bold.
    let pieces: Vec<&str> = section.split("**").collect();
    for pair in pieces[1..].chunks(2) {
        let (bold, after) = (pair[0], pair.get(1).copied().unwrap_or(""));
        let values = quantities(bold);
        if values.is_empty() {
            continue;
        }
        // The setter named right after the bold quantity, in the same sentence.
        let sentence = after.split(". ").next().unwrap_or("");
        let setter = sentence.split('`').nth(1).unwrap_or("");
        let expected = match setter {
            "ws_options_set_receive_queue_limit" => d.receive_queue_limit,
            "ws_options_set_send_queue_limit" => d.send_queue_limit,
            _ => continue,
        };
        assert_eq!(values, [expected as u128], "README: {setter}");
        checked += 1;
    }
    assert_eq!(checked, 2, "both queue limits are stated in bold");
}

/// `WS_STATUS_X = n` lines of the header, with the doc comment of each.
fn header_statuses(header: &str) -> BTreeMap<String, (u32, String)> {
    let mut out = BTreeMap::new();
    let mut doc = String::new();
    for line in header.lines() {
        let t = line.trim();
        if t.starts_with("/*") {
            doc.clear();
        }
        if let Some(text) = t.strip_prefix("/**").or_else(|| t.strip_prefix('*').filter(|r| !r.starts_with('/'))) {
            doc.push_str(text.trim_end_matches("*/"));
            doc.push(' ');
        }
        if let Some((name, number)) = t.strip_suffix(',').and_then(|l| l.split_once(" = ")) {
            if name.starts_with("WS_STATUS_") {
                out.insert(name.to_owned(), (number.parse().unwrap(), doc.clone()));
            }
        }
    }
    out
}

fn status_str(n: u32) -> String {
    let ptr = ws_status_str(n);
    assert!(!ptr.is_null());
    unsafe { CStr::from_ptr(ptr) }.to_str().unwrap().to_owned()
}

/// Words worth comparing (lower case, 4 letters or more, not the common ones).
fn words(text: &str) -> BTreeSet<String> {
    const COMMON: [&str; 10] =
        ["error", "callback", "with", "that", "this", "from", "than", "connection", "status", "call"];
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .map(str::to_ascii_lowercase)
        .filter(|w| w.len() >= 4 && !COMMON.contains(&w.as_str()))
        // A crude stem, so that "sends" meets "send" and "closed" meets "close".
        .map(|w| w.trim_end_matches('s').trim_end_matches("ed").to_owned())
        .collect()
}

#[test]
fn the_status_table_is_the_headers_and_ws_status_strs() {
    let readme = read("README.md");
    let header = header_statuses(&read("include/wsclient.h"));
    let rows = table_after(&readme, "## Status codes");
    let mut numbers = BTreeSet::new();
    let mut meanings = Vec::new();
    for row in &rows {
        let number: u32 = row[0].parse().unwrap_or_else(|_| panic!("{row:?}"));
        let name = row[1].trim_matches('`');
        let (in_header, doc) = header.get(name).unwrap_or_else(|| panic!("README's {name} is not in the header"));
        assert_eq!(*in_header, number, "README numbers {name} {number}, the header {in_header}");
        assert!(numbers.insert(number), "README lists {number} twice");
        let described = status_str(number);
        assert_ne!(described, "unknown status", "{name}");
        meanings.push((name.to_owned(), row[2].clone(), format!("{described} {doc}")));
    }
    assert_eq!(rows.len(), header.len(), "the header has statuses the README does not list");
    for n in 0..256 {
        if !numbers.contains(&n) {
            assert_eq!(status_str(n), "unknown status", "status {n}");
        }
    }
    // README's meanings cannot be swapped: each has a word in common with its own status's
    // description (its ws_status_str and its header comment), and for any two statuses the
    // meanings share more words with their own descriptions than with each other's.
    let score = |meaning: &str, description: &str| words(meaning).intersection(&words(description)).count();
    for (name, meaning, description) in &meanings {
        assert!(
            score(meaning, description) > 0,
            "README's meaning of {name} ({meaning:?}) has nothing in common with {description:?}"
        );
    }
    for (i, (a, meaning_a, description_a)) in meanings.iter().enumerate() {
        for (b, meaning_b, description_b) in &meanings[i + 1..] {
            let own = score(meaning_a, description_a) + score(meaning_b, description_b);
            let crossed = score(meaning_a, description_b) + score(meaning_b, description_a);
            assert!(
                own > crossed,
                "README's meanings of {a} ({meaning_a:?}) and {b} ({meaning_b:?}) fit each \
                 other's descriptions as well as their own"
            );
        }
    }
}

/// With plain ws_connect, a connection that never opens queues exactly the documented send
/// limit (64 MiB, each message counted with 46 bytes of bookkeeping) and refuses one byte more.
#[test]
fn the_default_send_queue_limit_is_64_mib() {
    let server = TestServer::start();
    let client = Client::new();
    let limit = 64 << 20;
    assert_eq!(wsclient::testing::defaults().send_queue_limit, limit);
    // The blackhole accepts TCP and never answers: nothing is ever written to the upgrade's end.
    let conn = client.connect(&format!("ws://127.0.0.1:{}/", server.blackhole_port));
    const BOOKKEEPING: usize = 46;
    let data = vec![7u8; limit];
    // Two messages that fill the limit exactly, bookkeeping included.
    let first = limit - 2 * BOOKKEEPING - 1;
    assert_eq!(send_binary(conn, &data[..first]), WsStatus::Ok);
    assert_eq!(send_binary(conn, &data[..1]), WsStatus::Ok);
    assert_eq!(send_binary(conn, &data[..0]), WsStatus::SendQueueFull);
    assert_eq!(send_text(conn, "x"), WsStatus::SendQueueFull);
    let mut queued = 0;
    assert_eq!(unsafe { ws_buffered_amount(conn, &mut queued) }, WsStatus::Ok);
    assert_eq!(queued, first + 1, "bufferedAmount counts payload bytes");
    // One message of exactly the limit, on a fresh connection.
    let conn = client.connect(&format!("ws://127.0.0.1:{}/", server.blackhole_port));
    assert_eq!(send_binary(conn, &data[..limit - BOOKKEEPING + 1]), WsStatus::SendQueueFull);
    assert_eq!(send_binary(conn, &data[..limit - BOOKKEEPING]), WsStatus::Ok);
    assert_eq!(send_binary(conn, &data[..0]), WsStatus::SendQueueFull);
}

struct Sizes(std::sync::Mutex<Vec<usize>>);

unsafe extern "C" fn record_size(_c: WsConn, _data: *const u8, len: usize, _k: WsMessageKind, user: *mut c_void) {
    (*(user as *const Sizes)).0.lock().unwrap().push(len);
}

/// With plain ws_connect, a message of exactly 64 MiB arrives and one of 64 MiB + 1 byte ends
/// the connection with WS_STATUS_MESSAGE_TOO_BIG. (That close 1009 goes out is tested with a
/// small limit in tests/options.rs: this server is still writing and does not see it.)
#[test]
fn the_default_max_message_size_is_64_mib() {
    let server = TestServer::start();
    let client = Client::new();
    let max = 64 << 20;
    assert_eq!(wsclient::testing::defaults().max_message_size, max);
    for (size, too_big) in [(max, false), (max + 1, true)] {
        let rec = Recorder::default();
        let sizes = Sizes(Default::default());
        let conn = client.connect(&server.url(&format!("/push?n=1&size={size}")));
        watch(conn, &rec);
        ws_on_message(conn, Some(record_size), &sizes as *const Sizes as *mut c_void);
        client.run_until_final(&rec, conn);
        let last = rec.of(conn).last().cloned().unwrap();
        if too_big {
            assert!(sizes.0.lock().unwrap().is_empty());
            match last {
                Ev::Error(_, WsStatus::MessageTooBig, message) => {
                    assert!(message.contains(&size.to_string()), "{message}")
                }
                other => panic!("{size} bytes: {other:?}"),
            }
        } else {
            assert_eq!(*sizes.0.lock().unwrap(), [size]);
            assert_eq!(last, Ev::Close(conn, 1000, "done".into()));
        }
    }
}
