//! The C side: the header compiles cleanly as C11 and C++17, and the C examples (built by
//! `make`) run against the local server under valgrind with zero errors and zero leaks.

mod common;

use common::skip_under_asan;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::server::TestServer;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn example(name: &str) -> PathBuf {
    let path = root().join("examples-c/build").join(name);
    assert!(path.exists(), "{} is missing: run `make test`, which builds the C examples first", path.display());
    path
}

/// Runs a program under valgrind memcheck; asserts exit 0 and returns its stdout.
fn memcheck(program: &Path, args: &[&str]) -> String {
    let output = Command::new("valgrind")
        .arg("-q")
        .arg(format!("--suppressions={}", root().join("tests/valgrind.supp").display()))
        .args(["--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite,indirect,possible"])
        .arg(program)
        .args(args)
        .output()
        .expect("valgrind runs (make test installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{} {args:?} failed ({}):\n{stdout}\n{stderr}", program.display(), output.status);
    stdout
}

fn compile_header(compiler: &str, std: &str, lang: &str) {
    let dir = std::env::temp_dir().join(format!("wsclient-header-{}-{lang}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = dir.join(if lang == "c" { "t.c" } else { "t.cpp" });
    std::fs::write(
        &source,
        "#include \"wsclient.h\"\nint main(void) { ws_status s = ws_client_free((ws_client *)0); return (int)s; }\n",
    )
    .unwrap();
    let status = Command::new(compiler)
        .args([std, "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-fsyntax-only", "-I"])
        .arg(root().join("include"))
        .arg(&source)
        .status()
        .unwrap_or_else(|e| panic!("{compiler}: {e}"));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(status.success(), "include/wsclient.h does not compile cleanly with {compiler} {std}");
}

#[test]
fn header_compiles_as_c11() {
    compile_header("cc", "-std=c11", "c");
}

#[test]
fn header_compiles_as_cxx17() {
    compile_header("c++", "-std=c++17", "cxx");
}

#[test]
fn echo_over_ws_under_valgrind() {
    if skip_under_asan("echo_over_ws_under_valgrind", "it runs the C programs, which do not use the ASan build") {
        return;
    }
    let server = TestServer::start();
    let out = memcheck(&example("echo"), &[&server.url("/echo")]);
    assert!(out.contains("close 4000 \"echo done\"") && out.ends_with("ok\n"), "{out}");
    server.log.wait_for(|l| l == "close 4000 echo done");
}

#[test]
fn echo_over_wss_under_valgrind() {
    if skip_under_asan("echo_over_wss_under_valgrind", "it runs the C programs, which do not use the ASan build") {
        return;
    }
    let server = TestServer::start();
    let url = server.wss_url("localhost", "/echo");
    let out = memcheck(&example("echo"), &[&url, server.ca_pem.to_str().unwrap()]);
    assert!(out.contains("binary echo: 5 bytes") && out.ends_with("ok\n"), "{out}");
}

#[test]
fn echo_reports_an_untrusted_server() {
    if skip_under_asan("echo_reports_an_untrusted_server", "it runs the C programs, which do not use the ASan build") {
        return;
    }
    let server = TestServer::start();
    let output = Command::new(example("echo")).arg(server.wss_url("localhost", "/echo")).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("TLS: certificate not trusted"), "{stderr}");
}

#[test]
fn flow_control_with_deferred_completion_under_valgrind() {
    if skip_under_asan(
        "flow_control_with_deferred_completion_under_valgrind",
        "it runs the C programs, which do not use the ASan build",
    ) {
        return;
    }
    let server = TestServer::start();
    let out = memcheck(&example("flow"), &[&server.url("/push?n=3000"), "3000"]);
    assert!(out.contains("close 1000 \"done\" after 3000 messages") && out.ends_with("ok\n"), "{out}");
}

#[test]
fn free_with_500_connections_open_under_valgrind() {
    if skip_under_asan(
        "free_with_500_connections_open_under_valgrind",
        "it runs the C programs, which do not use the ASan build",
    ) {
        return;
    }
    let server = TestServer::start();
    let out = memcheck(&example("many"), &[&server.url("/echo"), "500"]);
    assert!(out.starts_with("500 open, 500 alive at free"), "{out}");
    // Close frames are best effort within the 250 ms that ws_client_free takes (under valgrind
    // not all of them make it); every connection is ended either way.
    server.log.wait_for_count(500, |l| l == "ended");
    server.log.wait_for(|l| l == "close 1001 client shutting down");
}
