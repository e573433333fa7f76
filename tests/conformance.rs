//! RFC 6455 behaviour against independent implementations: Python's `websockets` and Node's
//! `ws`. Each test runs against both.

mod common;

use common::peers::Peer;
use common::*;

#[test]
fn echo_of_text_and_binary_from_0_bytes_to_16_mib() {
    for peer in [Peer::start_python(), Peer::start_node()] {
        let client = Client::new();
        let rec = Recorder::default();
        let conn = client.connect(&format!("{}/echo", peer.url()));
        watch(conn, &rec);
        let sizes = [0usize, 1, 125, 126, 65535, 65536, 1 << 20, 16 << 20];
        let mut expected = vec![Ev::Open(conn)];
        for (i, &size) in sizes.iter().enumerate() {
            let text: String = (0..size).map(|j| (b'a' + ((i + j) % 26) as u8) as char).collect();
            let binary: Vec<u8> = (0..size).map(|j| (i * 7 + j) as u8).collect();
            assert_eq!(send_text(conn, &text), WsStatus::Ok);
            assert_eq!(send_binary(conn, &binary), WsStatus::Ok);
            expected.push(Ev::Text(conn, text.into_bytes()));
            expected.push(Ev::Binary(conn, binary));
        }
        client.run_until("every echo", || rec.of(conn).len() == expected.len());
        assert!(rec.of(conn) == expected, "an echo differs");
    }
}

#[test]
fn server_close_codes_and_reasons_reach_the_close_callback() {
    for peer in [Peer::start_python(), Peer::start_node()] {
        let client = Client::new();
        let rec = Recorder::default();
        for code in [1000u16, 1001, 1011, 4000] {
            let conn = client.connect(&format!("{}/close?code={code}&reason=bye%20{code}", peer.url()));
            watch(conn, &rec);
            client.run_until_final(&rec, conn);
            assert_eq!(rec.of(conn), vec![Ev::Open(conn), Ev::Close(conn, code, format!("bye {code}"))]);
        }
    }
}

#[test]
fn client_close_code_and_reason_reach_the_server() {
    for peer in [Peer::start_python(), Peer::start_node()] {
        let client = Client::new();
        let rec = Recorder::default();
        let conn = client.connect(&format!("{}/echo", peer.url()));
        watch(conn, &rec);
        client.run_until("open", || !rec.of(conn).is_empty());
        assert_eq!(close(conn, 4321, "client says bye"), WsStatus::Ok);
        client.run_until_final(&rec, conn);
        assert_eq!(rec.of(conn).last(), Some(&Ev::Close(conn, 4321, "client says bye".into())));
        peer.wait_for_line("close 4321 client says bye");
    }
}

#[test]
fn a_fragmented_message_is_delivered_once() {
    for peer in [Peer::start_python(), Peer::start_node()] {
        let client = Client::new();
        let rec = Recorder::default();
        let conn = client.connect(&format!("{}/fragments", peer.url()));
        watch(conn, &rec);
        client.run_until("the message", || !rec.texts(conn).is_empty());
        assert_eq!(send_text(conn, "after"), WsStatus::Ok);
        client.run_until("the echo", || rec.texts(conn).len() == 2);
        assert_eq!(rec.texts(conn), ["hello wörld", "after"]);
    }
}

#[test]
fn server_ping_is_answered_with_its_payload() {
    for peer in [Peer::start_python(), Peer::start_node()] {
        let client = Client::new();
        let rec = Recorder::default();
        let conn = client.connect(&format!("{}/ping", peer.url()));
        watch(conn, &rec);
        client.run_until("the peer's confirmation", || rec.texts(conn) == ["pong:are you there"]);
    }
}

/// Keepalive pings go out when the connection is idle and are answered: the connection lives
/// on through several full keepalive timeouts. (Node's ws reports each ping it receives;
/// Python's asyncio API does not expose them.)
#[test]
fn keepalive_pings_keep_an_idle_connection_alive() {
    let peer = Peer::start_node();
    let client = Client::new();
    let options = Options::new();
    let timeout = 400;
    unsafe { ws_options_set_keepalive(options.0, 50, timeout) };
    let rec = Recorder::default();
    let conn = client.connect_with(&format!("{}/echo", peer.url()), options.0);
    watch(conn, &rec);
    client.run_until("open", || !rec.of(conn).is_empty());
    let pings = survive_keepalive(timeout, |n| peer.wait_for_lines("ping", n));
    assert!(pings >= 8, "only {pings} pings in four keepalive timeouts");
    assert_eq!(send_text(conn, "still here"), WsStatus::Ok);
    client.run_until("the echo", || rec.texts(conn) == ["still here"]);
    assert_eq!(rec.finals(conn), 0, "{:?}", rec.of(conn));
}
