//! `make install` gives a tree a C user can build against with pkg-config alone: installed into a
//! temporary prefix, examples-c/echo.c is built with nothing but `pkg-config --cflags --libs
//! wsclient` (shared) and `pkg-config --static --cflags --libs wsclient` (static), and both run
//! against the local server; the shared one is checked to have loaded the installed library.
//! Also: the installed tree is what a packager expects (DESTDIR, LIBDIR, links, modes, the .pc
//! file), `make uninstall` removes all of it, and the shared library exports only `ws_*`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use common::server::TestServer;
use common::skip_under_asan;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

const VERSION: &str = env!("CARGO_PKG_VERSION");
const MAJOR: &str = env!("CARGO_PKG_VERSION_MAJOR");

/// A directory of its own under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("wsclient-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn check(what: &str, output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{what} failed ({}):\n{stdout}\n{stderr}", output.status);
    stdout
}

/// `make TARGET VARS...` in the repository, as a user or packager runs it (not as part of the
/// make that runs the tests: its jobserver and flags stay out). One at a time: two installs at
/// once would both refresh the build tree's files (`make lib`'s soname link, for one).
fn make(target: &str, vars: &[String]) -> String {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let output = Command::new("make")
        .current_dir(root())
        .arg("--no-print-directory")
        .arg(target)
        .args(vars)
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("MAKELEVEL")
        .output()
        .expect("make runs");
    check(&format!("make {target} {vars:?}"), output)
}

/// pkg-config's answer for `args`, split into arguments, with the prefix's .pc file alone.
fn pkg_config(pc_dir: &Path, args: &[&str]) -> Vec<String> {
    let output = Command::new("pkg-config")
        .args(args)
        .arg("wsclient")
        .env("PKG_CONFIG_PATH", pc_dir)
        .env("PKG_CONFIG_LIBDIR", pc_dir)
        .output()
        .expect("pkg-config runs (make test installs it)");
    check(&format!("pkg-config {args:?}"), output).split_whitespace().map(str::to_owned).collect()
}

/// Builds examples-c/echo.c into `out` with the compiler and exactly the flags pkg-config gave.
fn build_echo(flags: &[String], out: &Path) {
    let output = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror"])
        .arg(root().join("examples-c/echo.c"))
        .arg("-o")
        .arg(out)
        .args(flags)
        .output()
        .expect("cc runs");
    check(&format!("cc echo.c {flags:?}"), output);
}

/// The shared libraries `program` names in its dynamic section (readelf -d).
fn needed(program: &Path) -> Vec<String> {
    let output = Command::new("readelf").arg("-d").arg(program).output().expect("readelf runs");
    check("readelf -d", output)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split('[').nth(1)?.trim_end_matches(']').to_owned()))
        .collect()
}

/// The files and links under `dir`, as paths relative to it, sorted ("x -> target" for links).
fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.strip_prefix(base).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_symlink() {
                out.push(format!("{name} -> {}", std::fs::read_link(&path).unwrap().display()));
            } else if meta.is_dir() {
                walk(base, &path, out);
            } else {
                out.push(name);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn installed_library_builds_and_runs_echo_with_pkg_config_alone() {
    if skip_under_asan("installed_library_builds_and_runs_echo", "it builds and runs C programs") {
        return;
    }
    let temp = TempDir::new("install");
    let prefix = temp.0.join("prefix");
    make("install", &[format!("PREFIX={}", prefix.display())]);
    let lib = prefix.join("lib");
    let pc_dir = lib.join("pkgconfig");

    // Shared: the flags pkg-config gives, and the installed library found at run time through
    // LD_LIBRARY_PATH (a prefix outside the loader's path; see the README for an rpath instead).
    let shared = temp.0.join("echo-shared");
    build_echo(&pkg_config(&pc_dir, &["--cflags", "--libs"]), &shared);
    assert!(needed(&shared).contains(&format!("libwsclient.so.{MAJOR}")), "{:?}", needed(&shared));
    let server = TestServer::start();
    let output = Command::new(&shared)
        .arg(server.url("/echo"))
        .env("LD_LIBRARY_PATH", &lib)
        .env("LD_DEBUG", "libs")
        .output()
        .unwrap();
    let stdout = check("echo (shared)", output.clone());
    assert!(stdout.contains("close 4000 \"echo done\"") && stdout.ends_with("ok\n"), "{stdout}");
    // The loader says which file it initialised: the installed one, by its soname link.
    let loader = String::from_utf8_lossy(&output.stderr);
    let installed = format!("calling init: {}/libwsclient.so.{MAJOR}\n", lib.display());
    assert!(loader.contains(&installed), "echo did not load {}:\n{loader}", lib.display());

    // Static: a prefix as a static-only package leaves it (no libwsclient.so, which the linker
    // would otherwise prefer), and the flags `pkg-config --static` gives, Libs.private included.
    let static_prefix = temp.0.join("static");
    make("install", &[format!("PREFIX={}", static_prefix.display())]);
    for name in [format!("libwsclient.so.{VERSION}"), format!("libwsclient.so.{MAJOR}"), "libwsclient.so".into()] {
        std::fs::remove_file(static_prefix.join("lib").join(name)).unwrap();
    }
    let flags = pkg_config(&static_prefix.join("lib/pkgconfig"), &["--static", "--cflags", "--libs"]);
    let static_echo = temp.0.join("echo-static");
    build_echo(&flags, &static_echo);
    assert!(!needed(&static_echo).iter().any(|n| n.starts_with("libwsclient")), "{:?}", needed(&static_echo));
    let output = Command::new(&static_echo).arg(server.url("/echo")).output().unwrap();
    let stdout = check("echo (static)", output);
    assert!(stdout.contains("close 4000 \"echo done\"") && stdout.ends_with("ok\n"), "{stdout}");
}

/// The README's "Size and debug info" figures (MB of 10^6 bytes) are within 10% of the real sizes:
/// the build tree's libraries (`make install` builds them) and the installed, stripped copies.
fn readme_sizes_are_true(installed_so: &Path, installed_a: &Path) {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let text = readme.split_whitespace().collect::<Vec<_>>().join(" ");
    // The n-th number in the words that follow `prefix`.
    let after = |prefix: &str, n: usize| -> f64 {
        let start = text.find(prefix).unwrap_or_else(|| panic!("README no longer says {prefix:?}")) + prefix.len();
        text[start..].split(' ').filter_map(|word| word.trim_matches(['(', ')']).parse().ok()).nth(n).unwrap()
    };
    let mb = |path: &Path| std::fs::metadata(path).unwrap().len() as f64 / 1e6;
    let release = root().join("target/release");
    for (what, stated, path) in [
        ("the built shared library", after("shared library is still", 0), release.join("libwsclient.so")),
        ("the built static library", after("and the static one", 0), release.join("libwsclient.a")),
        ("the installed shared library", after("stripped of both", 0), installed_so.to_owned()),
        ("the installed static library", after("stripped of both", 1), installed_a.to_owned()),
    ] {
        let real = mb(&path);
        assert!((real - stated).abs() <= stated * 0.1, "README: {what} is {stated} MB, really {real:.1} MB");
    }
}

/// What a packager runs: DESTDIR staging with a distribution's PREFIX and LIBDIR. The .pc file
/// names the final paths (without DESTDIR), relative to its prefix; uninstall removes everything.
#[test]
fn staged_install_is_a_tree_a_packager_accepts_and_uninstall_removes_it() {
    if skip_under_asan("staged_install_is_a_tree_a_packager_accepts", "it runs make install") {
        return;
    }
    let temp = TempDir::new("stage");
    let vars = [
        format!("DESTDIR={}", temp.0.display()),
        "PREFIX=/usr".to_owned(),
        "LIBDIR=/usr/lib/x86_64-linux-gnu".to_owned(),
    ];
    make("install", &vars);
    assert_eq!(
        tree(&temp.0),
        [
            "usr/include/wsclient.h".to_owned(),
            "usr/lib/x86_64-linux-gnu/libwsclient.a".to_owned(),
            format!("usr/lib/x86_64-linux-gnu/libwsclient.so -> libwsclient.so.{MAJOR}"),
            format!("usr/lib/x86_64-linux-gnu/libwsclient.so.{MAJOR} -> libwsclient.so.{VERSION}"),
            format!("usr/lib/x86_64-linux-gnu/libwsclient.so.{VERSION}"),
            "usr/lib/x86_64-linux-gnu/pkgconfig/wsclient.pc".to_owned(),
        ]
    );
    let lib = temp.0.join("usr/lib/x86_64-linux-gnu");
    use std::os::unix::fs::PermissionsExt;
    let mode = |name: &str| std::fs::metadata(lib.join(name)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&format!("libwsclient.so.{VERSION}")), 0o755);
    assert_eq!(mode("libwsclient.a"), 0o644);
    assert_eq!(
        std::fs::read(temp.0.join("usr/include/wsclient.h")).unwrap(),
        std::fs::read(root().join("include/wsclient.h")).unwrap()
    );

    // The soname is the major version's link; the installed library carries no debug info.
    let dynamic =
        check("readelf -d", Command::new("readelf").arg("-d").arg(lib.join("libwsclient.so")).output().unwrap());
    assert!(dynamic.contains(&format!("Library soname: [libwsclient.so.{MAJOR}]")), "{dynamic}");
    let sections =
        check("readelf -S", Command::new("readelf").arg("-S").arg(lib.join("libwsclient.so")).output().unwrap());
    assert!(!sections.contains(".debug_info"), "the installed shared library keeps its debug info");
    readme_sizes_are_true(&lib.join(format!("libwsclient.so.{VERSION}")), &lib.join("libwsclient.a"));

    let pc = std::fs::read_to_string(lib.join("pkgconfig/wsclient.pc")).unwrap();
    let field = |name: &str| {
        pc.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_else(|| panic!("no {name} in:\n{pc}")).trim().to_owned()
    };
    assert_eq!(field("prefix="), "/usr");
    assert_eq!(field("libdir="), "${prefix}/lib/x86_64-linux-gnu");
    assert_eq!(field("includedir="), "${prefix}/include");
    assert_eq!(field("Version:"), VERSION);
    assert_eq!(field("Cflags:"), "-I${includedir}");
    assert_eq!(field("Libs:"), "-L${libdir} -lwsclient");
    // Libs.private is rustc's own list for our static library, not one written by hand.
    let reported = std::fs::read_to_string(root().join("target/release/native-static-libs")).unwrap();
    assert_eq!(field("Libs.private:"), reported.trim());
    assert!(reported.contains("-lm") && reported.contains("-lpthread"), "{reported}");

    make("uninstall", &vars);
    assert_eq!(tree(&temp.0), Vec::<String>::new(), "uninstall leaves only the directories");
}

/// The shared library's dynamic symbol table exports the C API and nothing else (Rust's own
/// symbols, std's included, stay hidden), and every function of the header is among them.
#[test]
fn the_shared_library_exports_only_ws_functions() {
    let library = root().join("target/release/libwsclient.so");
    assert!(library.exists(), "{} is missing: run `make`", library.display());
    let output = Command::new("nm").args(["-D", "--defined-only"]).arg(&library).output().expect("nm runs");
    let exported: Vec<String> =
        check("nm -D", output).lines().filter_map(|l| l.split_whitespace().nth(2).map(str::to_owned)).collect();
    let foreign: Vec<&String> = exported.iter().filter(|name| !name.starts_with("ws_")).collect();
    assert!(foreign.is_empty(), "exported besides ws_*: {foreign:?}");
    let header = std::fs::read_to_string(root().join("include/wsclient.h")).unwrap();
    for name in header.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|w| w.starts_with("ws_")) {
        if header.contains(&format!(" {name}(")) || header.contains(&format!("*{name}(")) {
            assert!(exported.iter().any(|e| e == name), "{name} is in the header but not exported");
        }
    }
}
